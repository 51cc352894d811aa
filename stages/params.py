"""Reads params.yaml, checks every value in it, and resolves each try's config.

Stages that read params.yaml call `load_params()` first, so a typo anywhere stops
the pipeline before any work is done, with every problem listed at once.
A try's effective config is `train` overlaid with the try's own keys; a key
set to null inherits train's value (it is there so that `dvc exp run -S
tries.<try>.<key>=...` can set it: DVC's plain -S key=value only overrides keys that exist; its
-S ++key=value also adds them).
The configure stage writes each try's effective config to configs/<try>.yaml
(`try_config_file`), which is all that its train stage reads and depends on.
"""

import difflib
import math
import re
from pathlib import Path

import yaml

from stages.errors import ParamsError, PipelineError

PARAMS_FILE = Path("params.yaml")
CONFIGS_DIR = Path("configs")
DEVICES = ("auto", "cpu", "cuda", "mps")
OPTIMIZERS = ("adam", "adamw", "sgd")
TTA_MODES = ("none", "flip", "flip_translate")
# Every model a try may name (stages.models.MODELS), with the keys a try may set for that model only,
# and how many widths it takes (one per block). Kept here rather than read off the model classes so
# that the stages that only read params.yaml (download, configure) start without importing torch.
MODEL_OPTIONS = {
    "lenet": (),
    "lenet2": (),
    "lenet2_bn": (),
    "airbench": ("widths", "batchnorm_momentum", "logit_divisor", "whiten_bias_epochs"),
}
WIDTH_COUNTS = {"airbench": 3}
# Try names become file names (models/<try>.pt) and DVC stage names (train@<try>).
TRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # fullmatch: "$" would let a final newline in
# A try's plots go to plots/<try>/, beside the outputs of these stages (dvc.yaml): DVC refuses outputs that overlap.
# {name in plots/: its stage}
TAKEN_TRY_NAMES = {"report": "report", "histories.csv": "report", "page_template.html": "plots_page"}


class Yaml12Loader(yaml.SafeLoader):
    """Reads YAML as DVC does (YAML 1.2's core schema), so that a value means to a stage what `dvc params
    diff` and `dvc exp show` say it is: PyYAML's default, YAML 1.1, reads `yes` and `off` as booleans,
    where DVC shows the words, and `1e-3` as a word, where DVC shows a number."""


# The booleans, integers and floats of YAML 1.2, as ruamel.yaml (DVC's YAML library) resolves them, with the
# characters each may start with.
YAML12_SCALARS = {
    "tag:yaml.org,2002:bool": ("true|True|TRUE|false|False|FALSE", "tTfF"),
    "tag:yaml.org,2002:int": ("[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+", "-+0123456789"),
    "tag:yaml.org,2002:float": (
        r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+0123456789.",
    ),
}
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in YAML12_SCALARS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, (_pattern, _first) in YAML12_SCALARS.items():
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), list(_first))


def _construct_int(loader, node):
    """YAML 1.2's integers: 010 is ten (YAML 1.1's octal eight; 1.2 writes octal 0o10)."""
    scalar = loader.construct_scalar(node)
    text = scalar.replace("_", "")
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2], 10)
    try:
        return sign * int(digits if base == 10 else digits[2:], base)
    except ValueError:  # "+_" or "0x_": no digits, so a word, which the checks then name
        return scalar


def _construct_float(loader, node):
    """YAML 1.2's floats; "._" matches their pattern but holds no digit: a word, which the checks then name
    (ruamel.yaml, DVC's YAML library, raises on it)."""
    try:
        return loader.construct_yaml_float(node)
    except ValueError:
        return loader.construct_scalar(node)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def read_yaml(text):
    return yaml.load(text, Loader=Yaml12Loader)


class Rule:
    """A check on one value, with the words that tell the user what is allowed; hint follows them where a
    value is wrong (not where it is missing)."""

    def __init__(self, allowed, accepts, hint="", choices=()):
        self.allowed = allowed
        self.accepts = accepts
        self.hint = hint
        self.choices = choices  # the allowed words, where there is a list of them: a typo gets a "did you mean"


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(*choices, hint=""):
    return Rule(f"one of {', '.join(map(repr, choices))}", lambda v: isinstance(v, str) and v in choices, hint, choices)


POSITIVE_INT = Rule("an integer > 0", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE_NUMBER = Rule("a number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
PROBABILITY = Rule("a number from 0 to 1", lambda v: _is_number(v) and 0 <= v <= 1)
BELOW_ONE = Rule("a number >= 0 and < 1", lambda v: _is_number(v) and 0 <= v < 1)
# The integers torch takes: seeds are 64-bit unsigned; thread counts and sizes, C ints and longs.
SEED = Rule("an integer from 0 to 2**64 - 1", lambda v: _is_int(v) and 0 <= v < 2**64)
THREADS = Rule("an integer from 0 to 2**31 - 1", lambda v: _is_int(v) and 0 <= v < 2**31)
BATCH_SIZE = Rule("an integer from 1 to 2**63 - 1", lambda v: _is_int(v) and 0 < v < 2**63)
TRANSLATION = Rule("an integer from 0 to 16 (pixels)", lambda v: _is_int(v) and 0 <= v <= 16)
YAML11_BOOLEANS = {"y", "yes", "n", "no", "on", "off"}  # booleans in YAML 1.1 only (Yaml12Loader)
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
FLIP = Rule("true, false or 'alternate'", lambda v: isinstance(v, bool) or v == "alternate")
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
MD5 = Rule("32 hexadecimal digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{32}", v))
SCALE_RANGE = Rule(
    "a list [low, high] of numbers with 0 < low <= high",
    lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and 0 < v[0] <= v[1],
)

MOMENTUM_SHARE = Rule("a number > 0 and <= 1", lambda v: _is_number(v) and 0 < v <= 1)
WIDTHS = Rule(
    "a list of positive integers, one per block of the model, e.g. [24, 64, 128]",
    lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and x > 0 for x in v),
)

DATA_SCHEMA = {"url": TEXT, "md5": MD5}
TRAIN_SCHEMA = {
    "epochs": POSITIVE_INT,
    "batch_size": BATCH_SIZE,
    "lr": POSITIVE_NUMBER,
    "optimizer": one_of(*OPTIMIZERS),
    "momentum": BELOW_ONE,
    "nesterov": BOOLEAN,
    "weight_decay": NON_NEGATIVE_NUMBER,
    "norm_bias_lr": POSITIVE_NUMBER,
    "muon_lr": NON_NEGATIVE_NUMBER,
    "muon_momentum": BELOW_ONE,
    "warmup": BELOW_ONE,  # 1 would leave no step for the decay to lr_end
    "lr_start": NON_NEGATIVE_NUMBER,
    "lr_end": NON_NEGATIVE_NUMBER,
    "label_smoothing": BELOW_ONE,
    "lookahead": BELOW_ONE,
    "augment": BOOLEAN,
    "flip": FLIP,
    "translate": TRANSLATION,
    "tta": one_of(*TTA_MODES),
    "seed": SEED,
    "device": one_of(*DEVICES),
    "threads": THREADS,
    "amp": BOOLEAN,
}
AUGMENT_SCHEMA = {
    "flip_p": PROBABILITY,
    "rotation": NON_NEGATIVE_NUMBER,
    "shear": NON_NEGATIVE_NUMBER,
    "scale": SCALE_RANGE,
    "brightness": NON_NEGATIVE_NUMBER,
    "contrast": NON_NEGATIVE_NUMBER,
    "saturation": NON_NEGATIVE_NUMBER,
}
# After an unknown model's message: where a model of one's own goes (README: Adding a model).
NEW_MODEL = "; a model of your own goes in stages/models.py and stages/params.py (README: Adding a model)"
# Keys of a try only, never of train: its model, and options that only some models take (MODEL_OPTIONS).
# An option left out means the model's own value (its class constant), and a whitening bias that trains throughout.
MODEL_SCHEMA = {
    "model": one_of(*MODEL_OPTIONS, hint=NEW_MODEL),
    "widths": WIDTHS,
    "batchnorm_momentum": MOMENTUM_SHARE,
    "logit_divisor": POSITIVE_NUMBER,
    "whiten_bias_epochs": NON_NEGATIVE_INT,
}
TRY_SCHEMA = {**MODEL_SCHEMA, **TRAIN_SCHEMA}
CONFIG_KEYS = ("model", *TRAIN_SCHEMA)  # the keys every effective config of a try has
SECTIONS = {"data": DATA_SCHEMA, "train": TRAIN_SCHEMA, "augment": AUGMENT_SCHEMA, "tries": None}


def load_params(path=PARAMS_FILE):
    """Returns params.yaml as a dict, or raises ParamsError listing every problem."""
    path = Path(path)
    try:
        params = read_yaml(path.read_text())
    except FileNotFoundError:
        raise ParamsError([f"{path} not found; run from the project's root"], source=str(path)) from None
    except yaml.YAMLError as error:
        raise ParamsError([f"not valid YAML: {error}"], source=str(path)) from None
    problems = check_params(params)
    if problems:
        raise ParamsError(problems, source=str(path))
    return params


def check_params(params):
    """Returns a list of problems, one line each, naming the key, the value and what is allowed."""
    if not isinstance(params, dict):
        return [f"expected a mapping with sections {', '.join(SECTIONS)}, got {params!r}"]
    problems = [_unknown_key("", key, SECTIONS) for key in params if key not in SECTIONS]
    for section, schema in SECTIONS.items():
        if section not in params:
            problems.append(f"{section}: missing section")
        elif schema is not None:
            problems += check_mapping(section, params[section], schema, required=schema)
    if "tries" in params:
        problems += check_tries(params["tries"])
    if isinstance(params.get("train"), dict) and isinstance(params.get("tries"), dict):
        # Each try's effective config, and the keys of it that are valid enough to judge together.
        tries = {
            name: (resolve_try(params, name), judgeable_keys(problems, name, settings))
            for name, settings in params["tries"].items()
            if isinstance(settings, dict)
        }
        problems += check_nesterov(params, tries)
        problems += [
            problem for name, judged in tries.items() for problem in check_model_options(params, name, *judged)
        ]
    return problems


def concern(problems, where):
    """Whether any of problems is about where (a section, a try) or a key inside it."""
    return any(problem.startswith((f"{where}:", f"{where}.")) for problem in problems)


def judgeable_keys(problems, name, settings):
    """The keys of a try's effective config that no problem is about, where the try takes them from (its own
    setting, else train's): a combination can only be judged on valid values, and is judged once its are."""
    own = own_settings(settings)
    return {
        key
        for key in TRY_SCHEMA
        if not concern(problems, f"tries.{name}.{key}") and (key in own or not concern(problems, f"train.{key}"))
    }


def own_settings(settings):
    """What a try sets itself, in its order: a null key inherits train's."""
    return {key: value for key, value in settings.items() if value is not None}


def check_nesterov(params, tries):
    """Nesterov needs SGD with a momentum: one problem per key that turns it on, naming the tries it breaks,
    in each try whose nesterov, optimizer and momentum are judgeable (tries: name -> (config, judgeable keys))."""
    broken = {}  # (where, optimizer, momentum) -> tries
    for name, (config, keys) in tries.items():
        if {"nesterov", "optimizer", "momentum"} <= keys and config["nesterov"]:
            if config["optimizer"] != "sgd" or config["momentum"] == 0:
                where = f"tries.{name}.nesterov" if params["tries"][name].get("nesterov") else "train.nesterov"
                broken.setdefault((where, config["optimizer"], config["momentum"]), []).append(name)
    return [
        f"{where}: true needs optimizer sgd and a momentum > 0, got optimizer {optimizer!r} and momentum "
        f"{momentum} for {'try' if len(names) == 1 else 'tries'} {', '.join(map(str, names))}; "
        "set nesterov to false or use sgd with momentum"
        for (where, optimizer, momentum), names in broken.items()
    ]


def check_model_options(params, name, config, judgeable):
    """Options of a try that its model does not take, and widths that do not fit it, once its model is valid."""
    if "model" not in judgeable:
        return []
    model, problems = config["model"], []
    # Only the try's own options: train cannot hold one, and one with a bad value is named for that already.
    for option in sorted(own_settings(params["tries"][name]).keys() & judgeable & (MODEL_SCHEMA.keys() - {"model"})):
        if option not in MODEL_OPTIONS[model]:
            problems.append(
                f"tries.{name}.{option}: model {model!r} does not take it; only "
                f"{', '.join(models_taking(option))} does, so remove the key"
            )
    if "widths" in config and "widths" in judgeable:
        problems += widths_problems(f"tries.{name}", model, config["widths"])
    return problems


def widths_problems(where, model, widths):
    """[the problem] when model takes another number of widths than the list widths holds, else []."""
    count = WIDTH_COUNTS.get(model)
    if count and len(widths) != count:
        return [f"{where}.widths: got {widths!r}; model {model!r} takes {count} widths, one per block"]
    return []


def models_taking(option):
    return [name for name, options in MODEL_OPTIONS.items() if option in options]


def check_tries(tries):
    if not isinstance(tries, dict) or not tries:
        return [f"tries: expected a non-empty mapping of try name to its settings, got {tries!r}"]
    problems = []
    for name, settings in tries.items():
        if not isinstance(name, str):
            problems.append(f"tries.{name}: a try name must be text; quote it: '{name}'")
        elif not TRY_NAME.fullmatch(name):
            problems.append(
                f"tries.{name}: a try name may hold only letters, digits, '_', '.' and '-', "
                "and starts with a letter, digit or '_'"
            )
        elif name in TAKEN_TRY_NAMES:
            problems.append(
                f"tries.{name}: the name is taken: plots/{name} is the {TAKEN_TRY_NAMES[name]} stage's output, "
                "where this try's plots would go; name the try otherwise"
            )
        problems += check_mapping(f"tries.{name}", settings, TRY_SCHEMA, required=("model",), inherits=True,
                                  missing_hint=misspelt_try_hint(name, tries))  # fmt: skip
    return problems


def misspelt_try_hint(name, tries):
    """Said of a try without a model: `-S ++tries.lent.lr=...` makes a new try where tries.lenet was meant."""
    close = difflib.get_close_matches(str(name), [str(other) for other in tries if other != name], n=1)
    return f" (did you mean tries.{close[0]}? a new try needs its model)" if close else ""


def check_mapping(where, mapping, schema, required=(), inherits=False, missing_hint=""):
    """Checks one mapping against schema; the keys in required must be there (missing_hint follows the
    message of one that is not).

    inherits: the mapping is a try's own keys, where null means train's value (for any key but model).
    """
    if not isinstance(mapping, dict):
        return [f"{where}: expected a mapping with keys from {', '.join(schema)}, got {mapping!r}"]
    problems = []
    for key, value in mapping.items():
        if key not in schema:
            problems.append(_unknown_key(where, key, schema))
        elif value is None and inherits and key != "model":
            continue
        elif not schema[key].accepts(value):
            problems.append(wrong_value(f"{where}.{key}", value, schema[key]))
    missing = [key for key in required if key not in mapping]
    problems += [f"{where}.{key}: missing; expected {schema[key].allowed}{missing_hint}" for key in missing]
    return problems


def wrong_value(where, value, rule):
    # Case aside, close enough to be a slip ('Adam', 'lenet_2'), not another thing ('tpu' for 'cpu').
    close = difflib.get_close_matches(value.lower(), rule.choices, n=1, cutoff=0.75) if isinstance(value, str) else []
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    if isinstance(value, str) and value.lower() in YAML11_BOOLEANS and rule.accepts(True):
        guess = " (a word, not a boolean, in YAML 1.2, which DVC and the stages read)"
    return f"{where}: got {value!r}{guess}; expected {rule.allowed}{rule.hint}"


def _unknown_key(where, key, allowed):
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    prefix = f"{where}." if where else ""
    return f"{prefix}{key}: unknown key{hint}; allowed keys: {', '.join(allowed)}"


def resolve_try(params, name):
    """The effective config of one try: train's defaults overlaid with the try's keys that are not null."""
    if name not in params["tries"]:
        raise ParamsError([f"tries.{name}: no such try; tries are {', '.join(params['tries'])}"])
    return {**params["train"], **own_settings(params["tries"][name])}


def try_config_file(name, configs_dir=CONFIGS_DIR):
    return Path(configs_dir) / f"{name}.yaml"


def try_config(params, name):
    """What configs/<try>.yaml holds: the effective config, and the post's augmentation recipe if the try uses it.

    A try that does not augment gets no recipe, so that changing the recipe retrains only tries that use it.
    """
    config = resolve_try(params, name)
    return {**config, "augment_recipe": params["augment"]} if config["augment"] else config


def missing_config(path):
    """Why configs/<try>.yaml may be missing, with the tries that configure did write."""
    written = sorted(found.stem for found in path.parent.glob("*.yaml"))
    if not written:
        return f"{path} not found; `dvc repro` writes it (stage configure) from params.yaml"
    return (
        f"{path} not found; the tries configured are {', '.join(written)}: check the name against "
        "params.yaml's tries, and run `dvc repro` (stage configure) after adding one"
    )


def read_try_config(name, configs_dir=CONFIGS_DIR):
    """(config, recipe) of one try from configs/<try>.yaml; recipe is None when the try does not augment."""
    path = try_config_file(name, configs_dir)
    try:
        config = read_yaml(path.read_text())
    except FileNotFoundError:
        raise PipelineError(missing_config(path)) from None
    if not isinstance(config, dict):
        raise ParamsError([f"expected a mapping, got {config!r}"], source=str(path))
    recipe = config.pop("augment_recipe", None)
    problems = check_mapping(str(path), config, TRY_SCHEMA, required=CONFIG_KEYS)
    if config.get("augment") and recipe is None:
        problems.append(f"{path}: augment is true but augment_recipe is missing")
    if problems:
        raise ParamsError(problems, source=str(path))
    return config, recipe
