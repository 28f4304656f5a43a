"""``lrkd cache-teacher``: the stored top-k ids, log-probs and tail mass equal a plain
reference from the teacher's full logits at every target position (text and prompt+response
data, float32 and float16 storage); the hidden-state path equals the logits path; pieces and
shards change nothing; an interrupted run resumes with only the missing pieces; the manifest,
``teacher/`` and the size per token; bad inputs refused in one line naming the field; and the
command end to end."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_llama, make_tokenizer

from lrkd.data import cache_teacher as cache_module
from lrkd.data.cache_teacher import cache_teacher, cache_teacher_command, top_k_logprobs
from lrkd.data.manifest import MANIFEST, PrepareSettings
from lrkd.data.prepare import prepare
from lrkd.data.teacher_cache import (
    TEACHER_DIR,
    TeacherCacheInfo,
    expand_targets,
    read_teacher_cache,
    target_positions,
    teacher_config,
)

#: A teacher initialised wider than the default: its distributions are far from uniform (the
#: top 8 of 128 hold about half the mass), so top-k order and tail mass are really tested.
INIT = 0.2
K = 8

# ------------------------------------------------------------------------------------ helpers


def tiny_teacher(seed: int = 0) -> torch.nn.Module:
    return make_tiny_llama(seed=seed, initializer_range=INIT)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def text_records(n: int = 30) -> list[dict]:
    words = ("the", "cat", "sat", "on", "a", "mat", "while", "an", "old", "dog", "slept", "by",
             "the", "warm", "fire")  # fmt: skip
    return [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9))}
            for i in range(n)]  # fmt: skip


def pair_records(n: int = 24) -> list[dict]:
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}
               for i in range(n)]  # fmt: skip
    # A prompt that fills seq_length: kept (overlong="keep") with no target at all.
    return [*records, {"prompt": "x" * 60, "response": "y"}]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    tiny_teacher().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Prepared directories of three kinds: text in full blocks (``concat``), text documents
    of varying length (``documents``, right-padded in a batch) and prompt+response examples."""
    root = tmp_path_factory.mktemp("prepared")
    tok = make_tokenizer()
    text = write_jsonl(root / "text.jsonl", text_records())
    pairs = write_jsonl(root / "pairs.jsonl", pair_records())
    return {
        "concat": prepare([str(text)], root / "concat", tok,
                          PrepareSettings(seq_length=16, val_fraction=0.2)),
        "documents": prepare([str(text)], root / "documents", tok,
                             PrepareSettings(seq_length=24, pack="documents", val_fraction=0.2)),
        "prompt_response": prepare([str(pairs)], root / "pairs", tok,
                                   PrepareSettings(seq_length=40, overlong="keep",
                                                   val_fraction=0.2)),
    }  # fmt: skip


def rows(path: Path, split: str = "train") -> list[dict]:
    """Every example of a split: its prepared columns and its cache columns, as numpy."""
    from datasets import load_from_disk

    ds = load_from_disk(str(path / split)).with_format("numpy")
    return [ds[i] for i in range(len(ds))]


def reference(model: torch.nn.Module, ids: list[int], prompt_length: int, temperature: float):
    """The teacher's log-probs [n_targets, V] (float64) at an example's target positions, from
    its full logits on the example alone (no padding, no batch)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0].double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    positions = target_positions(len(ids), prompt_length)
    return logp[positions.start : positions.stop]


def check_against_reference(
    path: Path, model: torch.nn.Module, k: int, temperature: float, tol: float
) -> int:
    """Check every example of every split against :func:`reference`; return the number of
    target positions checked.

    Per position: the stored ids are distinct, their log-probs sorted and equal to the
    reference's for those ids, no token left out is more likely than one kept (a top-k,
    whatever the order of near ties), and the tail is ``log(1 - sum p_topk)`` in float64.
    """
    checked = 0
    for split in ("train", "val"):
        for row in rows(path, split):
            ids = row["input_ids"].tolist()
            prompt = int(row.get("prompt_length", 0))
            ref = reference(model, ids, prompt, temperature)
            n = ref.shape[0]
            top_ids = torch.from_numpy(row["topk_ids"].astype(np.int64)).reshape(n, k)
            top_lp = torch.from_numpy(row["topk_logprobs"].astype(np.float64)).reshape(n, k)
            tail = torch.from_numpy(row["tail_logprob"].astype(np.float64))
            assert tail.shape == (n,)
            for r in range(n):
                assert len(set(top_ids[r].tolist())) == k
            assert (top_lp[:, :-1] >= top_lp[:, 1:]).all()
            kept = ref.gather(1, top_ids)
            torch.testing.assert_close(top_lp, kept, rtol=tol, atol=tol)
            if k < ref.shape[1]:
                left = ref.scatter(1, top_ids, -math.inf).max(dim=1).values
                assert (kept.min(dim=1).values >= left - tol).all()
                ref_tail = torch.log1p(-kept.exp().sum(dim=1))
                torch.testing.assert_close(tail, ref_tail, rtol=tol, atol=tol)
            checked += n
            if not n:
                continue
            # the training side's expansion reads the same values back
            full = expand_targets(row["topk_ids"], row["topk_logprobs"], row["tail_logprob"],
                                  len(ids), prompt)  # fmt: skip
            positions = target_positions(len(ids), prompt)
            at = slice(positions.start, positions.stop)
            assert torch.equal(full["topk_ids"][at].long(), top_ids)
            torch.testing.assert_close(full["tail_logprob"][at].double(), tail)
    return checked


def assert_same_cache(a: Path, b: Path, k: int, tol: float = 1e-5) -> None:
    """Two caches of the same data hold the same distributions: the same ids with the same
    log-probs, except that near ties at the k-th place may swap (batches of other shapes round
    differently), and the same tails."""
    for split in ("train", "val"):
        rows_a, rows_b = rows(a, split), rows(b, split)
        assert len(rows_a) == len(rows_b)
        for x, y in zip(rows_a, rows_b, strict=True):
            assert np.array_equal(x["input_ids"], y["input_ids"])
            n = len(x["tail_logprob"])
            np.testing.assert_allclose(x["tail_logprob"], y["tail_logprob"], rtol=tol, atol=tol)
            for r in range(n):
                ids_x, ids_y = (z["topk_ids"][r * k : (r + 1) * k] for z in (x, y))
                lp_x, lp_y = (z["topk_logprobs"][r * k : (r + 1) * k] for z in (x, y))
                np.testing.assert_allclose(lp_x, lp_y, rtol=tol, atol=tol)
                same = dict(zip(ids_x.tolist(), lp_x.tolist(), strict=True))
                for token, value in zip(ids_y.tolist(), lp_y.tolist(), strict=True):
                    assert token in same or abs(value - lp_x[-1]) <= tol


def assert_identical(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        for x, y in zip(rows(a, split), rows(b, split), strict=True):
            assert x.keys() == y.keys()
            for name in x:
                assert np.array_equal(x[name], y[name]), name


class Interrupted(Exception):
    pass


class ForwardCounter:
    """Counts a model's forward calls; raises :class:`Interrupted` on call ``fail_at``."""

    def __init__(self, model: torch.nn.Module, fail_at: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise Interrupted(f"forward {self.calls}")

    def remove(self) -> None:
        self.handle.remove()


def build(prepared_dir: Path, out: Path, model=None, **kwargs) -> Path:
    """A cache of ``prepared_dir`` by the tiny in-memory teacher (k=8, float32 storage)."""
    kwargs = {"top_k": K, "logprob_dtype": "float32", "batch_size": 4, **kwargs}
    return cache_teacher(prepared_dir, out, model if model is not None else tiny_teacher(),
                         tokenizer=make_tokenizer(), **kwargs)  # fmt: skip


# ------------------------------------------------------------------------- 1. the reference


@pytest.mark.parametrize("logprob_dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ["concat", "documents", "prompt_response"])
def test_the_cache_equals_the_full_logits_reference(kind, logprob_dtype, prepared,
                                                    tmp_path) -> None:  # fmt: skip
    temperature = 1.5 if logprob_dtype == "float32" else 1.0
    out = build(prepared[kind], tmp_path / "cache", logprob_dtype=logprob_dtype,
                temperature=temperature, batch_size=3)  # fmt: skip
    # float16 keeps 11 significant bits: half an ulp of a log-prob near -8 is about 0.004
    tol = 1e-5 if logprob_dtype == "float32" else 4e-3
    checked = check_against_reference(out, tiny_teacher(), K, temperature, tol)
    info = read_teacher_cache(out)
    assert checked == info.target_tokens > 0
    from datasets import Value, load_from_disk

    cached, source = (load_from_disk(str(p / "train")) for p in (out, prepared[kind]))
    for name, feature in source.features.items():  # the prepared columns, types kept
        assert cached.features[name] == feature
    assert cached.features["topk_ids"].feature == Value("uint16")
    assert cached.features["topk_logprobs"].feature == Value(logprob_dtype)
    assert cached.features["tail_logprob"].feature == Value(logprob_dtype)
    if kind == "prompt_response":  # the example whose prompt fills seq_length has no target
        assert any(len(r["tail_logprob"]) == 0 for split in ("train", "val")
                   for r in rows(out, split))  # fmt: skip


def test_k_equal_to_the_vocabulary(prepared, tmp_path) -> None:
    out = build(prepared["concat"], tmp_path / "cache", top_k=TINY_VOCAB)
    check_against_reference(out, tiny_teacher(), TINY_VOCAB, 1.0, 1e-5)
    for row in rows(out):
        assert np.isneginf(row["tail_logprob"]).all()
        ids = row["topk_ids"].reshape(-1, TINY_VOCAB)
        assert (np.sort(ids, axis=1) == np.arange(TINY_VOCAB)).all()
        lse = np.logaddexp.reduce(row["topk_logprobs"].reshape(-1, TINY_VOCAB), axis=1)
        np.testing.assert_allclose(lse, 0.0, atol=1e-5)


# --------------------------------------------------------------------- 2. hidden vs logits


def test_top_k_logprobs_in_chunks_equals_one_chunk() -> None:
    torch.manual_seed(0)
    hidden, head = torch.randn(10, 16), torch.randn(50, 16)
    whole = top_k_logprobs(hidden, head, 5, 0.7, chunk_rows=100)
    chunked = top_k_logprobs(hidden, head, 5, 0.7, chunk_rows=3)
    for got, want in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, want)
    logp = torch.log_softmax((hidden @ head.T).double() / 0.7, dim=-1)
    values, indices = logp.topk(5, dim=-1)
    assert torch.equal(whole[0], indices)
    torch.testing.assert_close(whole[1].double(), values, rtol=1e-5, atol=1e-5)
    tail = torch.log1p(-values.exp().sum(-1))
    torch.testing.assert_close(whole[2].double(), tail, rtol=1e-5, atol=1e-5)
    empty = top_k_logprobs(hidden[:0], head, 5)
    assert [t.shape for t in empty] == [(0, 5), (0, 5), (0,)]


@pytest.mark.parametrize("teacher_dtype", ["float32", "bfloat16"])
def test_the_hidden_state_path_equals_the_logits_path(teacher_dtype, prepared, tmp_path,
                                                      monkeypatch) -> None:  # fmt: skip
    calls = {"hidden": 0}
    real = cache_module.final_hidden

    def spy(*args, **kwargs):
        calls["hidden"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "final_hidden", spy)
    data = prepared["prompt_response"]
    hidden = build(data, tmp_path / "hidden", teacher_dtype=teacher_dtype)
    used = calls["hidden"]
    assert used > 0
    monkeypatch.setattr(cache_module, "final_norm", lambda model: None)
    logits = build(data, tmp_path / "logits", teacher_dtype=teacher_dtype)
    assert calls["hidden"] == used  # the logits path this time
    # bf16: the head matmul is the same bf16 matmul on both paths, up to its blocking
    assert_same_cache(hidden, logits, K, tol=1e-5 if teacher_dtype == "float32" else 2e-2)
    assert read_teacher_cache(hidden).dtype == read_teacher_cache(logits).dtype == teacher_dtype


# ---------------------------------------------------------------------- 3. pieces, shards


def test_pieces_and_shards_change_nothing(prepared, tmp_path, caplog) -> None:
    data = prepared["documents"]
    whole = build(data, tmp_path / "whole", examples_per_piece=512)
    small = build(data, tmp_path / "small", examples_per_piece=3)
    assert_same_cache(whole, small, K)
    out = tmp_path / "sharded"
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        build(data, out, examples_per_piece=3, shard=0, num_shards=2)
    assert not out.exists()
    assert "pieces remain" in caplog.text
    staging = tmp_path / ".sharded.partial"
    done = sorted(p.name for p in (staging / "pieces").iterdir())
    assert done and all(not n.startswith(".") for n in done)
    build(data, out, examples_per_piece=3, shard=1, num_shards=2)
    assert not staging.exists()
    assert_identical(out, small)  # the same pieces in the same batches: bit for bit
    assert read_teacher_cache(out).target_tokens == read_teacher_cache(small).target_tokens


def test_a_piece_of_one_example_without_targets(prepared, tmp_path) -> None:
    data = prepared["prompt_response"]
    one = build(data, tmp_path / "one", examples_per_piece=1)
    assert_identical(one, build(data, tmp_path / "whole", batch_size=1))
    assert sum(len(r["tail_logprob"]) == 0 for r in rows(one) + rows(one, "val")) == 1


def test_shards_default_to_rank_and_world_size(prepared, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = tiny_teacher()
    counter = ForwardCounter(model)
    build(prepared["concat"], tmp_path / "cache", model, examples_per_piece=4, batch_size=1)
    pieces = sorted(p.name for p in (tmp_path / ".cache.partial" / "pieces").iterdir())
    train = sum(1 for p in pieces if p.startswith("train"))
    assert pieces and counter.calls > 0 and not (tmp_path / "cache").exists()
    # odd ordinals only: train pieces 1, 3, ... then val pieces continuing the count
    assert pieces[0] == "train-000001" and all(int(p[-6:]) % 2 == 1 for p in pieces[:train])


# -------------------------------------------------------------------------------- 4. resume


def test_an_interrupted_run_resumes_with_the_missing_pieces(prepared, tmp_path) -> None:
    data = prepared["concat"]
    model = tiny_teacher()
    counter = ForwardCounter(model)
    reference_out = build(data, tmp_path / "reference", model, examples_per_piece=2,
                          batch_size=1)  # fmt: skip
    total = counter.calls
    counter.remove()
    examples = read_teacher_cache(reference_out).target_tokens // 15  # 16-token blocks
    assert total == examples

    out = tmp_path / "cache"
    counter = ForwardCounter(model, fail_at=5)  # pieces 0 and 1 (2 examples each) finish
    with pytest.raises(Interrupted):
        build(data, out, model, examples_per_piece=2, batch_size=1)
    counter.remove()
    staging = tmp_path / ".cache.partial"
    assert sorted(p.name for p in (staging / "pieces").iterdir()) == [
        "train-000000", "train-000001"]  # fmt: skip
    assert not out.exists()

    counter = ForwardCounter(model)
    build(data, out, model, examples_per_piece=2, batch_size=1)
    counter.remove()
    assert counter.calls == total - 4
    assert not staging.exists()
    assert_identical(out, reference_out)

    counter = ForwardCounter(model)  # finished: returned at once
    assert build(data, out, model, examples_per_piece=2, batch_size=1) == out
    assert counter.calls == 0


def test_staging_of_another_cache_is_started_afresh(prepared, tmp_path, caplog) -> None:
    data = prepared["concat"]
    model = tiny_teacher()
    counter = ForwardCounter(model, fail_at=3)
    with pytest.raises(Interrupted):
        build(data, tmp_path / "cache", model, examples_per_piece=2, batch_size=1, top_k=4)
    counter.remove()
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        out = build(data, tmp_path / "cache", model, examples_per_piece=2, batch_size=1)
    assert "holds the pieces of another cache" in caplog.text
    check_against_reference(out, tiny_teacher(), K, 1.0, 1e-5)


# ------------------------------------------------------------------------------ 5. manifest


def test_the_manifest_and_the_teacher_directory(prepared, teacher_dir, tmp_path) -> None:
    data = prepared["prompt_response"]
    out = cache_teacher(data, tmp_path / "cache", str(teacher_dir), top_k=K,
                        teacher_dtype="float32", temperature=2.0)  # fmt: skip
    manifest = json.loads((out / MANIFEST).read_text())
    source = json.loads((data / MANIFEST).read_text())
    entry = manifest.pop("teacher_cache")
    assert set(entry) == set(TeacherCacheInfo.__dataclass_fields__)
    assert manifest.pop("key") != source.pop("key")
    assert manifest == source  # otherwise the prepared manifest as it was
    info = read_teacher_cache(out)
    assert info.teacher == str(teacher_dir)
    assert (info.dtype, info.temperature, info.top_k) == ("float32", 2.0, K)
    assert (info.logprob_dtype, info.id_type, info.vocab_size) == ("float16", "uint16",
                                                                   TINY_VOCAB)  # fmt: skip
    assert info.prepared == {"path": str(data.resolve()), "key": json.loads(
        (data / MANIFEST).read_text())["key"]}  # fmt: skip
    assert info.seconds > 0 and len(info.teacher_fingerprint) == 32

    files = {p.name for p in (out / TEACHER_DIR).iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth"))]
    assert teacher_config(out)["vocab_size"] == TINY_VOCAB
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "teacher", "train", "val"]
    assert not list(tmp_path.glob(".cache.partial*"))

    # Per target: k ids (2 bytes), k log-probs and one tail (2 bytes each, float16), plus an
    # int32 list offset per example for each of the three columns, and one more per Arrow
    # chunk (at most one per example): at most 2 * 12 bytes per example spread over its
    # targets.
    examples = sum(len(rows(out, split)) for split in ("train", "val"))
    base = 2 * K + 2 * (K + 1)
    assert base <= info.bytes_per_token <= base + 24 * examples / info.target_tokens
    check_against_reference(out, tiny_teacher(), K, 2.0, 4e-3)

    # The same cache again is not recomputed; another one needs overwrite.
    before = (out / MANIFEST).stat().st_mtime_ns
    again = cache_teacher(data, out, str(teacher_dir), top_k=K, teacher_dtype="float32",
                          temperature=2.0)  # fmt: skip
    assert again == out and (out / MANIFEST).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match=r"^--out .* --overwrite true"):
        cache_teacher(data, out, str(teacher_dir), top_k=4, teacher_dtype="float32")
    cache_teacher(data, out, str(teacher_dir), top_k=4, teacher_dtype="float32",
                  overwrite=True)  # fmt: skip
    assert read_teacher_cache(out).top_k == 4


def test_fingerprints_tell_teachers_apart(tmp_path) -> None:
    from lrkd.data.cache_teacher import teacher_fingerprint

    a, b = tiny_teacher(seed=0), tiny_teacher(seed=1)
    assert teacher_fingerprint(a) == teacher_fingerprint(tiny_teacher(seed=0))
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert teacher_fingerprint(tmp_path / "a") != teacher_fingerprint(tmp_path / "b")
    assert teacher_fingerprint(tmp_path / "a") == teacher_fingerprint(str(tmp_path / "a"))


# ---------------------------------------------------------------------------- 6. bad inputs


def other_tokenizer():
    tok = make_tokenizer()
    tok.add_tokens(["the"])
    return tok


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"top_k": 0}, r"^--top_k must be at least 1, got 0$"),
        ({"top_k": TINY_VOCAB + 1}, r"^--top_k must be at most the teacher's vocabulary \(128"),
        ({"logprob_dtype": "bfloat16"}, r"^--logprob_dtype='bfloat16'; choose one of float16"),
        ({"temperature": 0.0}, r"^--temperature must be a finite number above 0"),
        ({"temperature": float("nan")}, r"^--temperature must be a finite number above 0"),
        ({"batch_size": 0}, r"^--batch_size must be at least 1"),
        ({"teacher_dtype": "int8"}, r"^--teacher_dtype='int8'"),
        ({"shard": 2, "num_shards": 2}, r"^--shard must be in \[0, 2\)"),
        ({"tokenizer": other_tokenizer()}, r"^--teacher '.*' has another tokenizer than the one "
                                           r"--prepared .* \('.*'\); .*lrkd prepare --like"),
    ],
)  # fmt: skip
def test_bad_inputs_are_refused_in_one_line(change, pattern, prepared, tmp_path) -> None:
    kwargs = {"tokenizer": make_tokenizer(), "top_k": K, **change}
    with pytest.raises(ValueError, match=pattern) as err:
        cache_teacher(prepared["concat"], tmp_path / "cache", tiny_teacher(), **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_a_cache_given_as_prepared_is_refused(prepared, tmp_path) -> None:
    made = build(prepared["concat"], tmp_path / "cache")
    with pytest.raises(ValueError, match=r"^--prepared .* is a teacher cache") as err:
        build(made, tmp_path / "again")
    assert "\n" not in str(err.value) and str(prepared["concat"].resolve()) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"^--prepared .* is not a prepared dataset"):
        build(tmp_path / "nothing", tmp_path / "again")
    with pytest.raises(ValueError, match=r"^--out .* is the --prepared directory"):
        build(prepared["concat"], prepared["concat"])


def test_a_module_teacher_needs_its_tokenizer(prepared, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^tokenizer: a teacher given as a module"):
        cache_teacher(prepared["concat"], tmp_path / "cache", tiny_teacher())


# ------------------------------------------------------------------------------ 7. command


def test_the_command_end_to_end(prepared, teacher_dir, tmp_path) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(cache_teacher_command)
    args = parser.parse_args([
        "--prepared", str(prepared["documents"]), "--out", str(tmp_path / "cache"),
        "--teacher", str(teacher_dir), "--top_k", "4", "--teacher_dtype", "float32",
        "--logprob_dtype", "float32", "--examples_per_piece", "5", "--batch_size", "2",
    ])  # fmt: skip
    out = cache_teacher_command(**args.as_dict())
    assert out == tmp_path / "cache"
    info = read_teacher_cache(out)
    assert (info.top_k, info.logprob_dtype, info.teacher) == (4, "float32", str(teacher_dir))
    check_against_reference(out, tiny_teacher(), 4, 1.0, 1e-5)


def test_auto_teacher_dtype_follows_the_hardware(prepared, teacher_dir, tmp_path,
                                                 cpu_bf16) -> None:  # fmt: skip
    cpu_bf16(8.0)  # a CPU whose bf16 matmul is fast: auto is bfloat16
    out = cache_teacher_command(str(prepared["concat"]), str(tmp_path / "cache"),
                                str(teacher_dir), top_k=4)  # fmt: skip
    info = read_teacher_cache(out)
    assert (info.dtype, info.logprob_dtype) == ("bfloat16", "float16")
    # Against the teacher in bf16 run on each example alone: batched, a bf16 logit may round
    # one way or the other, and an ulp of a logit between 8 and 16 is 0.0625.
    check_against_reference(out, tiny_teacher().to(torch.bfloat16), 4, 1.0, 0.13)
