"""Bad input to finetune / evaluate: one line, exit 2, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml") if not p.name.startswith("distill-"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def assert_usage_error(result, *needles: str) -> None:
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def run(cli, tiny_bert, tmp_path):
    """finetune a seq-cls model on the given data; asserts the output folder was never created."""
    out = tmp_path / "out"

    def go(*args: str, task: str = "seq-cls"):
        result = cli("finetune", "--model", tiny_bert, "--task", task, "--out", out, "--quiet", *args)
        assert not out.exists(), "an error must leave no output folder behind"
        return result

    return go


def test_missing_data_file(run, tmp_path):
    assert_usage_error(run("--data", tmp_path / "nope.csv"), "nope.csv", "no such file")


def test_missing_column_names_the_columns_found(run, tmp_path):
    data = write(tmp_path / "d.csv", "review,label\ngood,1\nbad,0\n")
    assert_usage_error(run("--data", data), "no column 'text'", "columns found: review, label", "--text-column")
    assert_usage_error(run("--data", data, "--text-column", "review", "--label-column", "stars"), "no column 'stars'", "--label-column")


def test_label_outside_the_known_set_names_file_row_and_value(run, tmp_path, toy_data):
    train = write(tmp_path / "train.csv", "text,label\ngood,1\nbad,0\nfine,1\n")
    evals = write(tmp_path / "eval.csv", "text,label\ngood,1\nodd,7\n")
    assert_usage_error(run("--data", train, "--eval-data", evals), "eval.csv:line 3", "label 7", "0..1")
    evals = write(tmp_path / "eval3.csv", "text,label\ngood,meh\n")
    assert_usage_error(run("--data", toy_data / "train.csv", "--eval-data", evals), "eval3.csv:line 2", "'meh'", "neg, pos")


def test_label_not_an_int_where_ints_are_expected(run, tmp_path):
    data = write(tmp_path / "d.csv", "text,label\na,0\nb,1\nc,positive\nd,1\n")
    assert_usage_error(run("--data", data), "d.csv:line 4", "'positive'", "not an int")
    data = write(tmp_path / "e.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1.5}\n')
    assert_usage_error(run("--data", data), "e.jsonl:line 2", "1.5")


def test_empty_data(run, tmp_path):
    assert_usage_error(run("--data", write(tmp_path / "h.csv", "text,label\n")), "h.csv", "no rows")
    assert_usage_error(run("--data", write(tmp_path / "e.csv", 'text,label\n"",0\n"  ",1\n')), "empty")
    assert_usage_error(run("--data", write(tmp_path / "e.txt", "   \n\n"), task="causal-lm"), "empty")


def test_text_shorter_than_one_block(run, tmp_path):
    assert_usage_error(run("--data", write(tmp_path / "short.txt", "Hello there."), "--block-size", "64", task="causal-lm"),
                       "short.txt", "fewer than one block of 64", "--block-size")


def test_single_class_and_text_file_for_classification(run, tmp_path):
    assert_usage_error(run("--data", write(tmp_path / "one.csv", "text,label\na,x\nb,x\n")), "at least two classes")
    assert_usage_error(run("--data", write(tmp_path / "t.txt", "some text")), "no labels")


def test_unknown_recipe_key_and_bad_set_values(run, tmp_path, toy_data):
    recipe = write(tmp_path / "r.yaml", "task: seq-cls\ntrain:\n  learning_rate: 1e-4\n")
    assert_usage_error(run("--data", toy_data / "train.csv", "--recipe", recipe), "r.yaml", "unknown recipe key 'train.learning_rate'", "train.lr")
    assert_usage_error(run("--data", toy_data / "train.csv", "--set", "train.lr=fast"), "train.lr", "a number", "'fast'")
    assert_usage_error(run("--data", toy_data / "train.csv", "--set", "train.batch_size=2.5"), "train.batch_size", "an integer")
    assert_usage_error(run("--data", toy_data / "train.csv", "--set", "train.nope=1"), "unknown recipe key 'train.nope'")
    assert_usage_error(run("--data", toy_data / "train.csv", "--set", "trainlr"), "key=value")
    assert_usage_error(run("--data", toy_data / "train.csv", "--recipe", tmp_path / "missing.yaml"), "does not exist")


def test_recipe_errors_are_all_reported_with_their_place(run, tmp_path, toy_data):
    three = write(tmp_path / "three.yaml", "task: seq-cls\ntrain:\n  learning_rate: 1e-4\n  batch_size: many\nlora:\n  rank: 8\n")
    assert_usage_error(run("--data", toy_data / "train.csv", "--recipe", three),
                       "train.learning_rate", "'train.batch_size' expects an integer", "lora.rank")
    broken = write(tmp_path / "broken.yaml", "task: seq-cls\ntrain:\n  lr: [1e-4\n  epochs: 1\n")
    assert_usage_error(run("--data", toy_data / "train.csv", "--recipe", broken), "broken.yaml:line 4:column", "not valid YAML")


def test_validation_names_every_bad_flag_at_once(run, toy_data):
    code, _, err = run("--data", toy_data / "train.csv", "--lr", "-1", "--batch-size", "0", "--method", "dora")
    assert code == 2
    assert "--lr must be > 0" in err and "--batch-size must be >= 1" in err and "--method 'dora'" in err


def test_out_folder_that_is_not_an_llmkit_run_is_refused(cli, tiny_bert, toy_data, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    write(out / "thesis.tex", "years of work")
    args = ["finetune", "--model", tiny_bert, "--task", "seq-cls", "--data", toy_data / "train.csv", "--out", out, "--quiet",
            "--max-steps", "2"]
    assert_usage_error(cli(*args), "not an llmkit run", "--overwrite")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert cli(*args, "--overwrite")[0] == 0
    assert not (out / "thesis.tex").exists() and (out / "llmkit.json").exists()
    assert_usage_error(cli(*args), "already holds an llmkit run", "--resume")
    assert_usage_error(cli(*args, "--resume"), "finished")


def test_resume_without_a_run(cli, tiny_bert, toy_data, tmp_path):
    assert_usage_error(cli("finetune", "--model", tiny_bert, "--task", "seq-cls", "--data", toy_data / "train.csv",
                           "--out", tmp_path / "none", "--resume", "--quiet"), "not an llmkit run folder")


def test_wrong_model_kind(run, tmp_path, tiny_bert, toy_data, cli):
    assert_usage_error(run("--data", toy_data / "train.txt", task="causal-lm"), "not a causal LM")
    assert_usage_error(run("--data", toy_data / "train.csv", "--method", "lora", "--lora-targets", "q_proj"), "q_proj", "not found")
    assert_usage_error(cli("evaluate", "--model", tmp_path / "nope", "--data", toy_data / "eval.csv"), "no such file")
    assert_usage_error(cli("evaluate", "--model", tiny_bert, "--data", tmp_path / "x.csv"), "no such file")


def test_evaluate_block_longer_than_context(cli, tiny_gpt2, toy_data):
    assert_usage_error(cli("evaluate", "--model", tiny_gpt2, "--data", toy_data / "train.txt", "--block-size", "128"),
                       "longer than the model's context (64")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_loads_and_validates(recipe):
    from llmkit.config import load_recipe

    cfg = load_recipe(recipe, ["out=runs/test"])
    cfg.validate()
    assert cfg.task in ("causal-lm", "seq-cls") and cfg.model.name
    assert recipe.read_text().startswith("#"), "a recipe opens with a comment saying how to run it"
    assert "llmkit finetune --recipe recipes/" + recipe.name in recipe.read_text()


def test_recipes_cover_the_bundled_models():
    names = {r.stem for r in RECIPES}
    for must in ("smollm2-135m-shakespeare-full", "smollm2-135m-shakespeare-lora", "minilm-l6-sentiment-full",
                 "minilm-l6-sentiment-lora"):
        assert must in names
    assert any(n.startswith("gpt2") for n in names)


def test_every_flag_is_a_recipe_key():
    from llmkit.commands.finetune import FLAG_KEYS
    from llmkit.config import FinetuneConfig, keys

    known = set(keys(FinetuneConfig()))
    assert set(FLAG_KEYS.values()) <= known


def test_set_overrides_are_typed():
    from llmkit.config import load_recipe

    cfg = load_recipe(None, ["train.lr=1e-4", "train.max_steps=7", "lora.target_modules=q_proj,v_proj", "data.eval=null",
                             "train.group_by_length=false"])
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 7 and cfg.data.eval is None
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.train.group_by_length is False
    assert json.dumps(cfg.to_dict())  # llmkit.json-ready
