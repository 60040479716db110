import pytest

from librarian.core.config import load_params, parse_params, read_yaml
from librarian.core.errors import LibrarianError
from tests.helpers import ROOT, set_dotted


def test_committed_params_are_the_model_card():
    p = load_params(ROOT / "params.yaml")
    assert p.data.source == "hf:roneneldan/TinyStories" and p.data.fraction == 0.02
    assert p.tokenizer.vocab_size == 8000
    assert (p.model.n_layer, p.model.n_head, p.model.d_model, p.model.d_ff, p.model.context_length) == (2, 4, 128, 256, 128)
    assert p.model.dropout == 0.2
    assert (p.train.lr, p.train.batch_size, p.train.grad_accum, p.train.amp, p.train.patience) == (1e-4, 32, 1, True, 5)


BAD = [
    # (dotted key, value or DELETE, words the one-line message must contain)
    ("model.n_haed", 4, ["unknown key model.n_haed", "did you mean model.n_head"]),
    ("sede", 1, ["unknown key sede", "did you mean seed"]),
    ("model.n_head", "DELETE", ["missing key model.n_head"]),
    ("data", "DELETE", ["missing key data"]),
    ("train.batch_size", "32", ["train.batch_size", "wrong type", "valid integer"]),
    ("train.lr", "1e-4", ["train.lr", "wrong type", "remove the quotes"]),  # quoted in the file: text
    ("train.amp", "yes", ["train.amp", "boolean"]),
    ("model.n_layer", 2.5, ["model.n_layer", "integer"]),
    ("train.batch_size", 0, ["train.batch_size", "greater than or equal to 1", "got 0"]),
    ("model.d_model", -128, ["model.d_model", "greater than or equal to 1"]),
    ("train.lr", 0.0, ["train.lr", "greater than 0"]),
    ("model.n_head", 3, ["d_model (128) must be divisible by n_head (3)"]),
    ("model.dropout", 1.0, ["model.dropout", "less than 1"]),
    ("data.fraction", 0.0, ["data.fraction", "greater than 0"]),
    ("data.fraction", 1.5, ["data.fraction", "less than or equal to 1"]),
    ("data.val_fraction", 0.96, ["val_fraction + test_fraction must be < 1"]),
    ("tokenizer.vocab_size", 70000, ["tokenizer.vocab_size", "65536"]),
    ("tokenizer.vocab_size", 100, ["tokenizer.vocab_size", "257"]),
    ("tokenizer.special_tokens", ["<pad>"], ["special_tokens", "missing <|endoftext|>"]),
    ("clean.min_chars", 50000, ["min_chars (50000) must be < max_chars"]),
    ("data.source", "", ["data.source", "at least 1 character"]),
    # YAML 1.1 reads 1.5e6 (no exponent sign) as text: say which integer to write.
    ("train.max_tokens", "1.5e6", ["train.max_tokens", "write 1500000"]),
    ("train.max_tokens", 1.5, ["train.max_tokens", "valid integer"]),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_params_name_the_key_and_the_fix(raw_params, key, value, words):
    if value == "DELETE":
        *parents, leaf = key.split(".")
        section = raw_params
        for p in parents:
            section = section[p]
        del section[leaf]
    else:
        set_dotted(raw_params, key, value)
    with pytest.raises(LibrarianError) as info:
        parse_params(raw_params, "params.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("params.yaml: ")
    for word in words:
        assert word in message


def test_integral_floats_are_accepted_as_counts(make_params):
    # What `dvc exp run -S train.max_tokens=1.5e6` stores in params.yaml: 1500000.0.
    params = make_params(**{"train.max_tokens": 1.5e6, "train.batch_size": 32.0, "seed": 7.0})
    assert params.train.max_tokens == 1_500_000 and isinstance(params.train.max_tokens, int)
    assert params.train.batch_size == 32 and params.seed == 7


def test_several_problems_are_counted(raw_params):
    raw_params["model"]["n_layer"] = 0
    raw_params["train"]["lr"] = -1.0
    with pytest.raises(LibrarianError, match=r"and 1 more problem\)"):
        parse_params(raw_params)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 1\ndata:\n  source: [unclosed\n")
    with pytest.raises(LibrarianError, match=r"not valid YAML at line \d+"):
        load_params(bad)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(LibrarianError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(LibrarianError, match="must be a mapping"):
        load_params(tmp_path / "list.yaml")


def test_finetune_replaces_every_train_key_it_shares_but_stride(make_params):
    """TRAIN_KEYS cannot drift from the schema: each key finetune shares with train reaches the fine-tuning
    run with finetune's value; stride keeps train's (finetune's is read by the chat windows)."""
    from librarian.core.config import FinetuneParams, TrainParams
    from librarian.training.finetune import TRAIN_KEYS, finetune_params
    from tests.helpers import gpt_config

    shared = set(FinetuneParams.model_fields) & set(TrainParams.model_fields)
    assert {"lr", "schedule", "batch_size", "patience", "grad_clip"} <= set(TRAIN_KEYS) == shared - {"stride"}
    distinct = {"lr": 3.0e-3, "schedule": "wsd", "warmup_steps": 7, "min_lr": 1.0e-5, "decay_fraction": 0.3,
                "max_epochs": 9, "max_steps": 11, "max_tokens": 13, "batch_size": 24, "patience": 4,
                "weight_decay": 0.25, "grad_clip": 0.5, "stride": 96}
    assert set(distinct) == shared  # a key added to both sections needs a distinct value here
    params = make_params(**{f"finetune.{key}": value for key, value in distinct.items()})
    run = finetune_params(params, gpt_config()).train
    for key in TRAIN_KEYS:
        assert getattr(run, key) == distinct[key] != getattr(params.train, key), key
    assert run.stride == params.train.stride


def test_a_model_files_config_is_described_like_the_model_section():
    """GPTConfig adds vocab_size to ModelParams: it carries a description too (test_params_doc checks Params)."""
    from librarian.core.config import GPTConfig

    assert all(field.description for field in GPTConfig.model_fields.values())


def test_params_yaml_reads_as_dvc_reads_it(tmp_path):
    """YAML 1.2, as DVC: `lr: 1e-4` is a number to both (PyYAML's YAML 1.1 made it text to Librarian
    alone, so DVC saw nothing to rerun while a stage refused it)."""
    from dvc.utils.serialize import parse_yaml

    text = (ROOT / "params.yaml").read_text().replace("\n  lr: ", "\n  lr: 1e-4 # was ", 1)
    text = text.replace("\n  max_tokens: ", "\n  max_tokens: 1.5e6 # was ", 1)
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert (params.train.lr, params.train.max_tokens) == (1e-4, 1_500_000)
    assert parse_yaml(text, "params.yaml")["train"]["lr"] == read_yaml(text)["train"]["lr"] == 1e-4


@pytest.mark.parametrize("wrong", ["learning_rate", "lrate"])
def test_a_misspelt_key_is_named_with_the_key_it_was_meant_to_be(raw_params, wrong):
    raw_params["train"][wrong] = raw_params["train"].pop("lr")
    with pytest.raises(LibrarianError) as refused:
        parse_params(raw_params)
    assert str(refused.value) == (f"params: unknown key train.{wrong} (did you mean train.lr, which is missing?); "
                                  "fix its spelling")
