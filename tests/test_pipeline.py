"""Pipeline: packing loses nothing, order is a pure function of (seed, step), and each
family's batch obeys its contract."""

import collections
import json
import math

import numpy as np
import pytest

from matrixmagic.model import objectives
from matrixmagic.model.families import family_of
from matrixmagic.train.data import corpus as C
from matrixmagic.train.data import pipeline as P
from matrixmagic.train.data import prepare
from matrixmagic.train.data import shards as S
from matrixmagic.train.data.tokenizers import ByteTokenizer, TokenizerError

SEQ, B = 16, 8
BYTES = ByteTokenizer()
EOT, PAD, MASK, BOS = BYTES.eot_id, BYTES.pad_id, BYTES.mask_id, BYTES.bos_id


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root, data = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(40):  # 0..120 bytes: many documents are longer than a row
        text = "".join(rng.choice(list("abcdefgh é\n"), int(rng.integers(0, 120))))
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return C.open_corpus(root, data, validation_fraction=0.2)


def make(corpus, family="decoder", seed=0, batch_size=B, seq_len=SEQ, process_index=0, process_count=1, **kw):
    return P.make_pipeline(family, corpus, "bytes", seq_len=seq_len, batch_size=batch_size, seed=seed,
                           process_index=process_index, process_count=process_count, **kw)


def full_rows(batch):
    return np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- packing


def reference_pack(docs, row_len, eot=EOT, pad=PAD):
    """The packing rule written out: [eot, *doc] concatenated, cut into rows, the last padded."""
    stream = np.concatenate([np.concatenate([[eot], d]) for d in docs]).astype(np.int64)
    rows = np.full(max(1, math.ceil(len(stream) / row_len)) * row_len, pad, np.int64)
    rows[: len(stream)] = stream
    return rows.reshape(-1, row_len)


def shard_rows(tmp_path, docs, row_len, per_shard=2):
    """docs written as shards of `per_shard` documents, read back as rows of `row_len`."""
    counts = []
    for k in range(0, len(docs), per_shard):
        writer = S.ShardWriter(str(tmp_path), "train", k // per_shard, EOT, np.uint16)
        for d in docs[k : k + per_shard]:
            writer.add(d)
        counts.append(writer.commit()["tokens"])
    names = [S.shard_name("train", k) for k in range(len(counts))]
    return S.PackedRows(S.TokenStream(str(tmp_path), names, np.array(counts), np.dtype(np.uint16)), row_len, PAD)


def test_rows_cut_from_shards_are_the_packed_stream(tmp_path):
    docs = [np.arange(3), np.arange(0), np.arange(40) % 250, np.array([7]), np.arange(5)]
    for row_len in (1, 4, 8, 13):  # rows that span shard boundaries, and a row of one token
        (tmp_path / f"L{row_len}").mkdir()
        rows = shard_rows(tmp_path / f"L{row_len}", docs, row_len)
        expected = reference_pack(docs, row_len)
        assert rows.shape == expected.shape and len(rows) == len(expected)
        np.testing.assert_array_equal(rows[np.arange(len(rows))], expected)
        np.testing.assert_array_equal(rows[[len(rows) - 1, 0, 2]], expected[[-1, 0, 2]])
    with pytest.raises(S.CorpusError, match="eot_id"):
        S.ShardWriter(str(tmp_path), "train", 9, EOT, np.uint16).add(np.array([1, EOT]))


def test_packed_corpus_is_the_concatenated_token_stream(corpus):
    rows = P.packed_rows(corpus, "train", BYTES, SEQ + 1)
    expected = np.concatenate([np.concatenate([[EOT], BYTES.encode(t)]) for t in corpus.documents("train")])
    flat = np.asarray(rows).reshape(-1)
    np.testing.assert_array_equal(flat[: len(expected)], expected)
    assert (flat[len(expected):] == PAD).all() and len(flat) - len(expected) < SEQ + 1


def test_first_epochs_are_permutations_of_the_packed_rows(corpus):
    pipe = make(corpus)
    n = len(pipe.rows)
    seen = np.concatenate([full_rows(pipe.batch(s)) for s in range(math.ceil(2 * n / B) + 1)])
    packed = collections.Counter(map(tuple, np.asarray(pipe.rows, np.int32)))
    first, second = seen[:n], seen[n : 2 * n]
    assert collections.Counter(map(tuple, first)) == packed  # nothing lost, nothing twice
    assert collections.Counter(map(tuple, second)) == packed
    assert not np.array_equal(first, second)  # each epoch is reshuffled


def test_segments_and_positions_by_hand():
    rows = np.array([[5, 6, EOT, 7, 8, EOT, 9, PAD, PAD], [1, 2, 3, 4, EOT, 5, 6, 7, 8]])
    seg, pos = objectives.segments_and_positions(rows, EOT, PAD)
    np.testing.assert_array_equal(seg, [[1, 1, 2, 2, 2, 3, 3, 0, 0], [1, 1, 1, 1, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 0, 1, 2, 3, 4]])


def test_decoder_batches_follow_the_contract(corpus):
    pipe = make(corpus)
    for step in range(20):
        b = pipe.batch(step)
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            **{k: ((B, SEQ), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")},
            "loss_mask": ((B, SEQ), np.float32),
        }
        inputs, seg, pos = b["inputs"], b["segment_ids"], b["positions"]
        np.testing.assert_array_equal(inputs[:, 1:], b["targets"][:, :-1])
        assert (pos[inputs == EOT] == 0).all() and (pos[:, 0] == 0).all()
        real = inputs[:, 1:] != PAD
        starts = inputs[:, 1:] == EOT  # a new document: new segment id, positions restart
        np.testing.assert_array_equal(np.diff(seg)[real], starts[real].astype(int))
        np.testing.assert_array_equal(np.diff(pos)[real & ~starts], 1)
        expected_mask = (b["targets"] != EOT) & (b["targets"] != PAD)
        np.testing.assert_array_equal(b["loss_mask"], expected_mask.astype(np.float32))


def test_documents_longer_than_a_row_continue_in_the_next_row():
    rows = reference_pack([np.arange(30) % 250, np.arange(3)], 9)
    b = family_of("decoder").make_batch(rows, BYTES, seq_len=rows.shape[1] - 1)
    assert rows.shape == (4, 9) and (rows[1:3] != EOT).all()
    np.testing.assert_array_equal(b["segment_ids"][1], np.ones(8))
    np.testing.assert_array_equal(b["positions"][1], np.arange(8))  # restarts at the row
    assert b["loss_mask"][1].all() and b["loss_mask"][2].all()


# ----------------------------------------------------------------------------- order


@pytest.mark.parametrize("family", P.FAMILIES)
def test_same_seed_same_batches_other_seed_differs(corpus, family):
    a, b, c = make(corpus, family, seed=3), make(corpus, family, seed=3), make(corpus, family, seed=4)
    for step in (0, 1, 7, 123):
        assert_batches_equal(a.batch(step), b.batch(step))
    first = next(iter(a.batch(0).values()))
    assert not np.array_equal(first, next(iter(c.batch(0).values())))


def test_random_access_equals_iteration_and_state_resumes(corpus):
    run = make(corpus, "encoder", seed=11)
    it = iter(run)
    history = [next(it) for _ in range(12)]
    restarted = make(corpus, "encoder", seed=11)  # as after a restart
    for k in (0, 5, 11):
        assert_batches_equal(restarted.batch(k), history[k])
    it = run.iterator()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == 5
    resumed = make(corpus, "encoder", seed=11).iterator()
    resumed.set_state(state)
    for k in range(5, 12):
        assert_batches_equal(next(resumed), history[k])
    with pytest.raises(P.PipelineError, match="seed=11 differs.*restart with seed=11"):
        make(corpus, "encoder", seed=12).iterator().set_state(state)


@pytest.mark.parametrize("family", P.FAMILIES)
def test_two_processes_together_give_the_global_batch(corpus, family):
    whole = make(corpus, family, seed=5)
    halves = [make(corpus, family, seed=5, process_index=p, process_count=2) for p in (0, 1)]
    assert halves[0].local_batch_size == B // 2
    for step in (0, 3, 50):
        parts = [h.batch(step) for h in halves]
        for key, value in whole.batch(step).items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)


def test_process_layout_errors_and_default(corpus):
    with pytest.raises(P.PipelineError, match="batch_size=6 is not divisible by process_count=4"):
        make(corpus, batch_size=6, process_count=4)
    with pytest.raises(P.PipelineError, match="process_index=2"):
        make(corpus, process_index=2, process_count=2)
    pipe = P.make_pipeline("decoder", corpus, "bytes", seq_len=SEQ, batch_size=B)  # from jax
    assert (pipe.process_index, pipe.process_count, pipe.local_batch_size) == (0, 1, B)


def test_bad_arguments_name_the_fix(corpus):
    with pytest.raises(P.PipelineError, match="family='decodr'"):
        make(corpus, "decodr")
    with pytest.raises(P.PipelineError, match="seq_len=0"):
        make(corpus, seq_len=0)
    with pytest.raises(P.PipelineError, match="mask_rate=1.5"):
        make(corpus, "encoder", mask_rate=1.5)
    with pytest.raises(P.PipelineError, match="seed=-1"):
        make(corpus, seed=-1)
    with pytest.raises(P.PipelineError, match="step=-1"):
        make(corpus).batch(-1)
    with pytest.raises(TokenizerError, match="magic data --tokenizer sentencepiece"):
        P.make_pipeline("decoder", corpus, "sentencepiece", process_index=0, process_count=1)


def test_packed_rows_are_prepared_once(corpus, monkeypatch):
    make(corpus, seq_len=12)

    def no_repack(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(prepare, "run_task", no_repack)
    pipe = make(corpus, seq_len=20)  # another row length reads the same shards
    assert isinstance(pipe.rows, S.PackedRows) and pipe.rows.row_len == 21
    assert (corpus.directory / "prepared" / "bytes" / S.INDEX).is_file()


# ----------------------------------------------------------------------------- families


def test_mlm_masks_fifteen_percent_eighty_ten_ten(corpus):
    pipe = make(corpus, "encoder", seq_len=128, seed=2)
    batches = [pipe.batch(s) for s in range(60)]
    get = lambda key: np.concatenate([b[key] for b in batches])
    inputs, targets, selected = get("inputs"), get("targets"), get("loss_mask") > 0
    eligible = (targets != EOT) & (targets != PAD)
    assert not selected[~eligible].any()  # never a special or padding
    assert abs(selected.sum() / eligible.sum() - 0.15) < 0.01
    masked = selected & (inputs == MASK)
    random = selected & (inputs != MASK) & (inputs != targets)
    kept = selected & (inputs == targets)
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.03
    assert abs(random.sum() / n - 0.1) < 0.03 and abs(kept.sum() / n - 0.1) < 0.03
    assert (inputs[random] < 256).all()  # a random *real* token
    np.testing.assert_array_equal(inputs[~selected], targets[~selected])
    packed = collections.Counter(map(tuple, np.asarray(pipe.rows, np.int32)))
    assert all(tuple(row) in packed for row in targets)  # targets are the original rows
    assert (get("token_types") == 0).all()
    assert batches[0]["loss_mask"].dtype == np.float32


def test_mlm_masks_each_epoch_differently(corpus):
    pipe = make(corpus, "encoder", seed=1, batch_size=1)
    n = len(pipe.rows)
    by_row = collections.defaultdict(list)
    for step in range(3 * n):
        b = pipe.batch(step)
        by_row[tuple(b["targets"][0])].append(b["inputs"][0])
    assert any(not np.array_equal(v[0], v[1]) for v in by_row.values())


def test_seq2seq_prefix_continuation(corpus):
    pipe = make(corpus, "encoder_decoder", seq_len=16)  # data.seq_len: 8 for the encoder, 8 for the decoder
    partial = 0
    for step in range(30):
        b = pipe.batch(step)
        assert b["encoder_inputs"].shape == (B, 8) and b["decoder_targets"].shape == (B, 8)
        assert (b["decoder_inputs"][:, 0] == BOS).all()
        np.testing.assert_array_equal(b["decoder_inputs"][:, 1:], b["decoder_targets"][:, :-1])
        mask, targets, dec_seg = b["loss_mask"] > 0, b["decoder_targets"], b["decoder_segment_ids"]
        assert (np.diff(mask.astype(int)) <= 0).all()  # the continuation is a prefix
        assert not np.isin(targets[mask], [EOT, PAD]).any()  # never another document
        stops = mask.sum(1)
        for row, stop in enumerate(stops):
            if 0 < stop < 8:
                assert targets[row, stop] in (EOT, PAD)  # stops exactly where the document ends
                partial += 1
        last_enc = b["encoder_segment_ids"][:, -1:]
        np.testing.assert_array_equal(dec_seg, np.where(mask, last_enc, 0))
        np.testing.assert_array_equal(b["decoder_positions"], np.where(mask, np.arange(8), 0))
    assert partial > 0  # the test did see document boundaries inside the decoder window


# ----------------------------------------------------------------------------- eval


def eval_batches(corpus, family="decoder", **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return P.make_eval_batches(family, corpus, "bytes", seq_len=SEQ, batch_size=B, **kw)


def test_eval_batches_are_validation_rows_spread_over_the_split(corpus):
    rows = np.asarray(P.packed_rows(corpus, "validation", BYTES, SEQ + 1), np.int32)
    assert len(rows) > 2 * B
    batches = eval_batches(corpus, num_eval_batches=2)
    assert len(batches) == 2
    picked = np.linspace(0, len(rows) - 1, 2 * B).astype(np.int64)  # first and last row included
    np.testing.assert_array_equal(np.concatenate([full_rows(b) for b in batches]), rows[picked])
    for a, b in zip(batches, eval_batches(corpus, num_eval_batches=2)):
        assert_batches_equal(a, b)


@pytest.mark.parametrize("family", P.FAMILIES)
def test_eval_batches_pad_the_tail_and_slice_by_process(corpus, family):
    whole = eval_batches(corpus, family, num_eval_batches=100)
    n_rows = len(P.packed_rows(corpus, "validation", BYTES, family_of(family).row_len(SEQ)))
    assert len(whole) == math.ceil(n_rows / B)
    assert whole[-1]["loss_mask"][n_rows % B or B :].sum() == 0  # filler rows
    halves = [eval_batches(corpus, family, num_eval_batches=100, process_index=p, process_count=2) for p in (0, 1)]
    for k, batch in enumerate(whole):
        for key, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([h[k][key] for h in halves]), value, err_msg=key)
    with pytest.raises(P.PipelineError, match="num_eval_batches=0"):
        eval_batches(corpus, family, num_eval_batches=0)


def test_sentencepiece_pipeline_after_prepare_tokenizer(corpus, tmp_path_factory):
    src = tmp_path_factory.mktemp("spsrc")
    for i in range(12):
        (src / f"m{i}.py").write_text(f"def function_{i}(value):\n    return value * {i}  # ünï\n" * 30)
    sp_corpus = C.open_corpus(src, tmp_path_factory.mktemp("spdata"))
    with pytest.raises(TokenizerError, match="magic data --tokenizer sentencepiece"):
        P.make_pipeline("decoder", sp_corpus, "sentencepiece", seq_len=SEQ, batch_size=B,
                        process_index=0, process_count=1)
    tok = P.prepare_tokenizer(sp_corpus, "sentencepiece", vocab_size=400)
    assert P.prepare_tokenizer(sp_corpus, "sentencepiece").cache_key == tok.cache_key  # kept, not retrained
    pipe = P.make_pipeline("decoder", sp_corpus, "sentencepiece", seq_len=SEQ, batch_size=B,
                           process_index=0, process_count=1)
    b = pipe.batch(0)
    assert b["inputs"].max() < tok.vocab_size and pipe.tokenizer.cache_key == tok.cache_key
    mlm = P.make_pipeline("encoder", sp_corpus, tok, seq_len=SEQ, batch_size=B, process_index=0, process_count=1)
    assert (mlm.batch(0)["inputs"] == tok.mask_id).any()
