"""Text-to-text (generative) adapters on a tiny random Llama: the response-only loss mask, chat-template
prompts and generation, Rouge-L against rouge-score, the built-in tasks, and the CLI end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adapterhub.data.text2text import (
    TEXT2TEXT_TASKS,
    Text2TextData,
    load_text2text_dataset,
    load_text2text_task,
)
from adapterhub.errors import DataError, TrainingError
from adapterhub.evaluation.generation import exact_match, generate, rouge_l, score_generations
from adapterhub.training import TrainConfig
from adapterhub.training.model import SparseDeltaModel, load_backbone, load_tokenizer
from adapterhub.training.sft import SFTBatcher, fit_sft, patched_weights, response_loss, train_sft_adapter
from test_training_util import tiny_model

CHAT = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}[CLS] x : {% endif %}")
WORDS = ["good", "great", "fine", "love", "nice", "bad", "awful", "poor", "hate", "sad"]


def _pairs(n: int) -> list[tuple[str, str]]:
    """Toy pairs: a word -> its opposite's group word (learnable by a tiny model)."""
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        out.append((f"the movie was {w}", "positive" if i % len(WORDS) < 5 else "negative"))
    return out


def _word_tokenizer(folder: Path, chat: bool) -> None:
    """A whole-word tokenizer (lower-cased, whitespace split) with BOS/EOS/PAD, optionally a chat template, saved
    into ``folder`` (the model's vocabulary is 64)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "user", "x", ":", "positive", "negative", "the", "movie", "was",
             "it", "so", "very", "and", "plot", "dull", "question", "answer", *WORDS]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="[CLS]",
                                  eos_token="[SEP]")
    if chat:
        tok.chat_template = CHAT
    tok.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny random Llama with a whole-word tokenizer that has EOS and BOS tokens, no chat template."""
    folder = tiny_model("llama", tmp_path_factory.mktemp("t2t") / "llama")
    for f in folder.glob("*.txt"):
        f.unlink()  # the WordPiece vocabulary of the shared helper: replaced
    _word_tokenizer(folder, chat=False)
    return folder


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory) -> Path:
    """The same tiny Llama with a chat template on its tokenizer."""
    folder = tiny_model("llama", tmp_path_factory.mktemp("t2t_chat") / "llama")
    for f in folder.glob("*.txt"):
        f.unlink()
    _word_tokenizer(folder, chat=True)
    return folder


def _data(n: int = 40) -> Text2TextData:
    rows = _pairs(n)
    return Text2TextData("toy", rows, rows[:8], rows[:8])


# ---------------------------------------------------------------------------- loss mask

def test_response_only_loss_matches_a_hand_computed_loss(llama):
    tok = load_tokenizer(llama)
    b = SFTBatcher(tok, 32, chat_template=False)
    rows = [("the movie was good", "positive"), ("it was so very bad and awful", "negative x")]
    batch = b.batch(rows, torch.device("cpu"))
    model = load_backbone(llama, "causal-lm", torch.float32, torch.device("cpu")).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # by hand: each pair alone, no padding; NLL of the response tokens and EOS only
    total, ntok = 0.0, 0
    for prompt, response in rows:
        p = [tok.bos_token_id] + tok(prompt + "\n", add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + r])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for j, t in enumerate(r):
            total -= float(lp[len(p) + j - 1, t])
            ntok += 1
    assert ntok == int((batch["labels"] != -100).sum())
    assert float(response_loss(logits, batch["labels"])) == pytest.approx(total / ntok, rel=1e-5)
    # the library's training loss is the same number
    sdm = SparseDeltaModel(model, "causal-lm", {}, 0, torch.device("cpu"), autocast=False)
    loss, _ = sdm.forward(batch)
    assert float(loss) == pytest.approx(total / ntok, rel=1e-5)
    # prompt tokens contribute nothing: changing a prompt's labels region never matters, changing its response does
    assert (batch["labels"][0, :len(p) - 0] == -100).sum() >= 5


def test_prompt_tokens_get_no_gradient(llama):
    """Perturbing the logits at prompt positions leaves the loss unchanged."""
    tok = load_tokenizer(llama)
    b = SFTBatcher(tok, 32, chat_template=False)
    batch = b.batch([("the movie was good", "positive")], torch.device("cpu"))
    logits = torch.randn(1, batch["input_ids"].shape[1], 64, requires_grad=True)
    response_loss(logits, batch["labels"]).backward()
    first = int((batch["labels"][0] != -100).nonzero()[0])  # the first response token
    assert logits.grad is not None
    assert torch.all(logits.grad[0, :first - 1] == 0) and torch.any(logits.grad[0, first - 1] != 0)


def test_truncation_keeps_the_template_and_the_eos(chat_llama):
    b = SFTBatcher(load_tokenizer(chat_llama), 16, chat_template=True)
    ids, labels = b.encode("the movie was " + "very " * 40 + "good", "positive")
    assert len(ids) <= 16 and ids[-1] == b.eos and labels[-1] == b.eos
    assert b.tok.decode(ids[:3]) == "[CLS] user :" and b.tok.decode(ids[-6:-2]) == "[SEP] [CLS] x :"
    assert b.tok.decode(ids[-2:-1]) == "positive"


# ---------------------------------------------------------------------------- chat template and generation

def test_chat_template_prompt_and_generation(chat_llama, llama):
    tok = load_tokenizer(chat_llama)
    b = SFTBatcher(tok, 64)  # None: the tokenizer has a template, so it is used
    assert b.format == "chat"
    assert tok.decode(b.prompt_ids("the movie was good")) == "[CLS] user : the movie was good [SEP] [CLS] x :"
    assert SFTBatcher(load_tokenizer(llama), 64).format == "plain"
    with pytest.raises(TrainingError, match="no chat template"):
        SFTBatcher(load_tokenizer(llama), 64, chat_template=True)
    model = load_backbone(chat_llama, "causal-lm", torch.float32, torch.device("cpu"))
    prompts = ["the movie was good", "bad", "it was so very awful and the plot was dull"]
    out = generate(model, b, prompts, max_new_tokens=5, batch_size=2)
    # each batched, left-padded generation equals the same prompt decoded alone, greedily, by hand
    for p, got in zip(prompts, out, strict=True):
        ids = torch.tensor([b.prompt_ids(p)])
        for _ in range(5):
            with torch.no_grad():
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == b.eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert got == tok.decode(ids[0, len(b.prompt_ids(p)):], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------- scores

def test_rouge_l_matches_rouge_score_and_lcs():
    from rouge_score import rouge_scorer

    ref = "the cat sat on the mat"
    pred = "the cat lay on a mat"
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l(pred, ref) == pytest.approx(expected)
    # by hand: LCS "the cat on mat" = 4 of 6 and 6 tokens: P = R = F = 2/3
    assert rouge_l(pred, ref) == pytest.approx(2 / 3)
    assert rouge_l("", ref) == 0.0 and rouge_l(ref, ref) == 1.0
    assert exact_match(" Texas. ", "texas") and not exact_match("Texas City", "Texas")
    s = score_generations(["Texas", "ohio river"], ["texas", "Ohio"])
    assert s["exact_match"] == 0.5 and s["rougeL"] == pytest.approx((1 + 2 / 3) / 2) and s["n"] == 2


# ---------------------------------------------------------------------------- data

def test_builtin_text2text_tasks():
    assert len(TEXT2TEXT_TASKS) >= 8
    assert sum(s.generative for s in TEXT2TEXT_TASKS.values()) >= 3
    d = load_text2text_task("t2t-state-abbrev")
    assert d.counts() == {"train": 82, "validation": 10, "test": 10}
    assert load_text2text_task("t2t-state-abbrev").fingerprint() == d.fingerprint()  # seeded: same rows
    assert all(r in ("AL", "Alabama") for p, r in d.train + d.validation + d.test if "Alabama" in p or "AL?" in p)
    slang = load_text2text_task("t2t-sms-slang")
    assert all("<" not in p and "&amp;" not in r for p, r in slang.train)
    v = load_text2text_task("t2t-sms-spam")
    assert {r for _, r in v.train} == {"ham", "spam"} and v.labels == ["ham", "spam"] and not v.generative


def test_user_dataset_columns_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) for i in range(20)) + "\n")
    d = load_text2text_dataset(f"jsonl:{p}", prompt_column="q", response_column="a")
    assert sum(d.counts().values()) == 20 and d.train[0][1].startswith("answer")
    with pytest.raises(DataError, match="no prompt column 'prompt'"):
        load_text2text_dataset(f"jsonl:{p}")
    c = tmp_path / "d.csv"
    c.write_text("prompt,response\nhello,\n")
    with pytest.raises(DataError, match="row 1"):
        load_text2text_dataset(f"csv:{c}")


# ---------------------------------------------------------------------------- training

@pytest.mark.parametrize("method", ["sparse", "lora", "full"])
def test_sft_trainers_lower_the_response_loss(llama, method):
    cfg = TrainConfig(steps=12, batch_size=8, max_length=24, lr=1e-2, density=0.2, select_steps=3,
                      reselect_every=3, max_eval_examples=8)
    res = fit_sft(method, llama, _data(), cfg, eval_generate=4, max_new_tokens=3)
    losses = res.trainer.losses
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert 0.0 <= res.metrics["validation_rougeL"] <= 1.0 and res.metrics["validation_loss"] > 0


def test_sparse_sft_adapter_card_and_exact_restore(llama):
    cfg = TrainConfig(steps=6, batch_size=8, max_length=24, density=0.1, select_steps=2, reselect_every=2,
                      granularity="block", block_size=8)
    adapter, res = train_sft_adapter(llama, _data(), cfg, task_name="toy", eval_generate=2, max_new_tokens=2)
    assert adapter.card["model_kind"] == "causal-lm" and adapter.card["prompt"]["format"] == "plain"
    assert adapter.card["text2text"]["max_new_tokens"] == 2 and adapter.card["mask"]["granularity"] == "block"
    sdm = res.trainer.sdm
    before = {k: w.detach().clone() for k, w in sdm.weights.items()}
    with patched_weights(sdm):
        assert any(not torch.equal(before[k], w) for k, w in sdm.weights.items())
    assert all(torch.equal(before[k], w) for k, w in sdm.weights.items())  # restored bit for bit


def test_bucketed_order_is_a_seeded_permutation(llama):
    b = SFTBatcher(load_tokenizer(llama), 32)
    rows = [(" ".join(["good"] * (i % 7 + 1)), "positive") for i in range(50)]
    order = b.bucketed_order(rows, 4)
    a = order(torch.Generator().manual_seed(0))
    assert sorted(a) == list(range(50)) and a == order(torch.Generator().manual_seed(0))
    assert len(a[-2:]) == 2 and len({len(rows[i][0]) for i in a[-2:]}) >= 1  # the short batch stays last
    # within a batch, lengths are sorted (one window of 16 batches covers the 50 rows)
    lens = [b.length(rows[i]) for i in a[:48]]
    spread = sum(max(lens[i:i + 4]) - min(lens[i:i + 4]) for i in range(0, 48, 4))
    assert spread <= 12


def test_sft_refuses_an_encoder(tmp_path):
    enc = tiny_model("bert", tmp_path / "bert")
    with pytest.raises(TrainingError, match="causal LM"):
        fit_sft("sparse", enc, _data(), TrainConfig(steps=2, select_steps=1, batch_size=4, max_length=16))


# ---------------------------------------------------------------------------- CLI end to end

def test_cli_train_merge_deploy_eval_text2text(tmp_path, home, chat_llama):
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from adapterhub.cli.main import cli

    def h(*args: str) -> str:
        r = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.stdout

    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps({"q": p, "a": r}) for p, r in _pairs(60)) + "\n")
    h("base", "add", "ll", str(chat_llama))
    common = ["--base", "ll", "--steps", "6", "--batch-size", "8", "--max-length", "24", "--density", "0.1",
              "--select-steps", "2", "--max-eval-examples", "4", "--json"]
    a = json.loads(h("train", *common, "--dataset", f"jsonl:{data}", "--prompt-column", "q",
                     "--response-column", "a", "--name", "toy"))
    b = json.loads(h("train", *common, "--task", "t2t-state-abbrev", "--name", "abbrev"))
    assert a["metrics"]["validation_rougeL"] >= 0 and b["task"] == "t2t-state-abbrev"
    ev = json.loads(h("eval", b["ref"], "--split", "validation", "--max-examples", "4", "--json"))
    assert ev["n"] == 4 and 0 <= ev["rougeL"] <= 1 and ev["metric_keys"]["rougeL"] == "validation_rougeL"
    h("merge", "toy@1", "abbrev@1", "--method", "uniform-sparse", "--name", "both")
    h("deploy", "create", "d1", "--base", "ll")
    folder = Path(json.loads(h("deploy", "apply", "d1", "both@1", "--json"))["path"])
    model = AutoModelForCausalLM.from_pretrained(str(folder))  # a plain Hugging Face folder
    b_ = SFTBatcher(load_tokenizer(folder), 24)
    assert b_.format == "chat"
    prompts = [p for p, _ in _pairs(6)]
    out = generate(model, b_, prompts, max_new_tokens=4)
    # oracle: the base with the merged adapter applied in memory generates the same, from the same weights
    from adapterhub.apply.patching import apply_adapter
    from adapterhub.workspace import Workspace

    with Workspace.open(home) as w:
        merged = w.load_adapter(w.resolve("both@1"))
    oracle = AutoModelForCausalLM.from_pretrained(str(chat_llama))
    apply_adapter(oracle, merged)
    sd_dep, sd_or = model.state_dict(), oracle.state_dict()
    sd_base = AutoModelForCausalLM.from_pretrained(str(chat_llama)).state_dict()
    assert any(not torch.equal(sd_or[k], sd_base[k]) for k in sd_or)  # the merge changed weights
    assert all(torch.equal(sd_dep[k], sd_or[k]) for k in sd_or)
    assert out == generate(oracle, b_, prompts, max_new_tokens=4)
    dev = json.loads(h("eval", "both@1", "--task", "t2t-state-abbrev", "--deployment", "d1", "--split",
                       "validation", "--max-examples", "4", "--json"))
    assert dev["source"] == "deployment:d1" and dev["n"] == 4 and math.isfinite(dev["rougeL"])
