// vlmc's chat page: a conversation over POST /v1/chat/completions (streamed), with images as data: URIs.
"use strict";

const config = JSON.parse(document.getElementById("vlmc-config").textContent);
const $ = (id) => document.getElementById(id);
const history = [];   // OpenAI messages sent so far (user turns with their images, assistant replies)
let pending = [];     // data: URIs of the images attached to the next message
let controller = null;

$("model-name").textContent = config.model;
$("model-limits").textContent = `context ${config.context} tokens · up to ${config.max_images} images per ` +
  `message, ${(config.max_image_pixels / 1e6).toFixed(0)} Mpixels each · ${config.max_request_mb} MiB per request`;
document.title = `${config.model} · vlmc`;
if (config.auth) {
  $("key-label").hidden = false;
  $("api-key").value = localStorage.getItem("vlmc-api-key") || "";
  $("api-key").addEventListener("change", () => localStorage.setItem("vlmc-api-key", $("api-key").value));
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function bubble(role, text, images) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  pending.forEach((url, i) => {
    const thumb = document.createElement("span");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.src = url;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Remove";
    remove.onclick = () => { pending.splice(i, 1); renderAttachments(); };
    thumb.append(img, remove);
    box.appendChild(thumb);
  });
}

function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showError(`${file.name || "the file"} is not an image`);
      continue;
    }
    if (pending.length >= config.max_images) {
      showError(`at most ${config.max_images} images per message`);
      break;
    }
    const reader = new FileReader();
    reader.onload = () => { pending.push(reader.result); renderAttachments(); };
    reader.onerror = () => showError(`could not read ${file.name}`);
    reader.readAsDataURL(file);
  }
}

$("file").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.items || [])].filter((i) => i.kind === "file").map((i) => i.getAsFile());
  if (files.length) { e.preventDefault(); addFiles(files); }
});
const composer = $("composer");
document.addEventListener("dragover", (e) => { e.preventDefault(); composer.classList.add("dragging"); });
document.addEventListener("dragleave", () => composer.classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  composer.classList.remove("dragging");
  addFiles(e.dataTransfer.files);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); composer.requestSubmit(); }
});
$("clear").onclick = () => {
  history.length = 0;
  $("messages").replaceChildren();
  showError("");
};
$("stop").onclick = () => controller && controller.abort();

function errorText(body, status) {
  try { return JSON.parse(body).error.message; } catch { return `HTTP ${status}: ${body.slice(0, 300)}`; }
}

async function send(text, images) {
  const content = images.map((url) => ({type: "image_url", image_url: {url}}));
  if (text) content.push({type: "text", text});
  const message = {role: "user", content};
  const body = {model: config.model, messages: [...history, message], stream: true,
                max_tokens: Number($("max-tokens").value) || undefined,
                temperature: Number($("temperature").value) || 0};
  bubble("user", text, images);
  const out = bubble("assistant", "", []);
  const span = out.querySelector(".text");
  out.dataset.state = "streaming";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  const headers = {"Content-Type": "application/json"};
  if (config.auth) headers.Authorization = `Bearer ${$("api-key").value}`;
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body),
                                                        signal: controller.signal});
    if (!resp.ok) throw new Error(errorText(await resp.text(), resp.status));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) { span.textContent += delta; out.scrollIntoView({block: "end"}); }
      }
    }
    history.push(message, {role: "assistant", content: span.textContent});
    out.dataset.state = "done";
  } catch (err) {
    out.dataset.state = "error";
    showError(err.name === "AbortError" ? "stopped" : String(err.message || err));
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").hidden = true;
  }
}

composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text && !pending.length) return;
  showError("");
  const images = pending;
  pending = [];
  renderAttachments();
  $("prompt").value = "";
  send(text, images);
});
