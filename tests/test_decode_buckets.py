"""Decode batch buckets: a step runs the smallest compiled decode batch that holds its sequences, padding rows
change nothing, and a sequence moved to another slot (the scheduler's compaction) decodes as if it had not moved."""

import numpy as np
import pytest

from compiled import BUILD, compile_artifact, vlmc


@pytest.fixture(scope="module")
def batch4(checkpoints, tmp_path_factory):
    ws = tmp_path_factory.mktemp("buckets_ws")
    return compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], ws, "--max-prefill", 128,
                            "--max-context", 192, "--batch-size", 4, "--tp", 2)


def prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n) for n in lengths]


def text_positions(n):
    return np.tile(np.arange(n, dtype=np.int64), (3, 1))


def test_manifest_lists_the_buckets(batch4):
    from vlmc.runtime.artifact import read_manifest

    manifest = read_manifest(batch4, kind="llm")
    assert manifest["decode_buckets"] == [1, 2, 4]
    assert {"decode_1", "decode_2", "decode_4"} <= set(manifest["graphs"])
    assert manifest["graphs"]["decode_2"]["batch"] == 2


def test_batched_and_moved_sequences_decode_as_alone(batch4):
    from vlmc.runtime.llm.engine import Sequence
    from vlmc.runtime.llm.runtime import DistributedEngine, LLMArtifact

    artifact = LLMArtifact(batch4)
    engine = DistributedEngine(artifact)  # tp 2: moves are broadcast to the other rank
    try:
        vocab = engine.embed.vocab_size
        ids = prompts(vocab, (9, 30, 17))
        seqs = [Sequence(slot, 0) for slot in range(3)]
        logits = [engine.prefill(s, engine.embed.lookup(p), text_positions(len(p))) for s, p in zip(seqs, ids)]
        assert engine.decode_batch(1) == 1 and engine.decode_batch(3) == 4

        # Reference: each sequence alone in slot 3 (a batch-1 step), fed the batched run's tokens.
        def alone(prompt, tokens):
            s = Sequence(3, 0)
            out = [engine.prefill(s, engine.embed.lookup(prompt), text_positions(len(prompt)))]
            for t in tokens:
                out.append(engine.decode([s], [t])[0])
                assert engine.last_decode_batch == 1
            engine.release(s)
            return out

        tokens = [[] for _ in seqs]
        steps = [[row] for row in logits]
        for step in range(6):
            if step == 3:  # sequence 0 finishes; the last one moves into its slot, as the server does
                engine.release(seqs[0])
                engine.move(seqs[2], 0)
                assert seqs[2].slot == 0 and int(engine.cache.lengths[2]) == 0
            live = [1, 2] if step >= 3 else [0, 1, 2]
            order = sorted(live, key=lambda i: seqs[i].slot)
            for i in order:
                tokens[i].append(int(np.argmax(steps[i][-1])))
            out = engine.decode([seqs[i] for i in order], [tokens[i][-1] for i in order])
            assert out.shape[0] == len(order)
            assert engine.last_decode_batch == (2 if step >= 3 else 4)
            for i, row in zip(order, out):
                steps[i].append(row)
        for i, prompt in enumerate(ids):
            ref = alone(prompt, tokens[i])
            assert len(ref) == len(steps[i])
            for ours, theirs in zip(steps[i], ref):
                np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())
    finally:
        engine.close()


def test_decode_buckets_are_validated(checkpoints, tmp_path):
    config = tmp_path / "llm.yaml"
    config.write_text((BUILD / "qwen2_5_vl_llm.yaml").read_text().replace(
        "decode_buckets: null", "decode_buckets: [1, 8]").replace("batch_size: 1 ", "batch_size: 4 "))
    assert "decode_buckets: [1, 8]" in config.read_text() and "batch_size: 4 " in config.read_text()
    proc = vlmc("compile", config, "--checkpoint", checkpoints["tiny"], "--workspace", tmp_path / "ws",
                check=False)
    assert proc.returncode != 0
    assert "decode bucket 8 must be between 1 and batch_size=4" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "ws").exists()
