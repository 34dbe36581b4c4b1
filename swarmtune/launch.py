"""What the entry points (train, generate, eval, swarm up) share: configs, recipes, the model and its swarm.

Configs are found whether swarmtune is installed (as package data) or run from a checkout. Every
value a command reads is checked against its dataclass, and every path and address looked at,
before anything slow starts. Without swarm peers, the command uses the swarm that
`python -m swarmtune.swarm up` keeps running for the model, or else an embedded LocalSwarm that
serves it for the duration of the command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

from swarmtune import errors, shutdown
from swarmtune.errors import UserError

_CHECKOUT = Path(__file__).resolve().parent.parent


def config_path() -> str:
    """The packaged configs (pkg://) when installed with them, else the checkout's conf/ folder."""
    if importlib.util.find_spec("swarmtune.conf") is not None:
        return "pkg://swarmtune.conf"
    return str(_CHECKOUT / "conf")


def recipes_dir() -> Traversable:
    if importlib.util.find_spec("swarmtune.recipes") is not None:
        return resources.files("swarmtune.recipes")
    return _CHECKOUT / "recipes"


def register_recipes(groups: tuple[str, ...] | None = None) -> list[str]:
    """Store every recipes/*.yaml in Hydra's ConfigStore as option NAME of group `recipe` (global package).

    A search path cannot do this: Hydra names groups after folders, and the folder is `recipes/`.
    With `groups`, a recipe keeps only its choices and values for those groups (and for `eval`),
    for commands whose config has no other groups.
    """
    store = ConfigStore.instance()
    names = []
    for entry in sorted(recipes_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            name = entry.name[:-len(".yaml")]
            node = OmegaConf.create(entry.read_text())
            if groups is not None:
                node = _only(node, groups)
            store.store(group="recipe", name=name, node=node, package="_global_")
            names.append(name)
    return names


def _only(recipe: DictConfig, groups: tuple[str, ...]) -> DictConfig:
    defaults = [d for d in recipe.get("defaults", []) if isinstance(d, str) and d == "_self_"
                or isinstance(d, DictConfig) and any(k.split("/")[-1] in groups for k in d)]
    kept = {key: recipe[key] for key in recipe if key in groups or key == "eval"}
    return OmegaConf.create({"defaults": defaults, **kept})


def reported() -> contextlib.AbstractContextManager:
    """What the Hydra entry points wrap their work in: user errors (bad values in the config included)
    in one or two lines, unless HYDRA_FULL_ERROR=1."""
    return errors.reported(expected=(OmegaConfBaseException,))


def run_hydra_app(app, config_name: str, argv: list[str] | None = None) -> None:
    """Run the Hydra entry point `app` (of primary config `config_name`): its command line checked first, and
    SIGTERM or SIGINT, whenever they come, stopping it as Ctrl-C does (every swarm process it started too)."""
    with shutdown.stopped_by_signals():
        with reported():
            check_command_line(config_name, sys.argv[1:] if argv is None else argv)
        app()


# ---- the command line, before Hydra reads it ------------------------------------------------------


def check_command_line(config_name: str, argv: list[str]) -> None:
    """Two of Hydra's answers in words that say what to do, before Hydra starts: a value with spaces left
    unquoted by the shell (Hydra: `missing EQUAL at '<EOF>'`), and a key the config lacks (Hydra: append
    it with `+`, which then fails later, in Lightning's or a dataclass's words). Anything else is left
    to Hydra."""
    from hydra._internal.utils import get_args_parser  # Hydra's own: its flags read exactly as Hydra reads them

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # Hydra will say what is wrong with its own flags
        return
    if (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.config_name
            or args.config_path or args.config_dir or args.experimental_rerun):
        return
    check_overrides(config_name, args.overrides, multirun=args.multirun)


def check_overrides(config_name: str, overrides: list[str], multirun: bool = False) -> None:
    """`overrides` parse (see check_command_line), and name keys of the config composed from `config_name`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    parser, parsed = OverridesParser.create(), []
    for i, text in enumerate(overrides):
        try:
            parsed.append(parser.parse_override(text))
        except HydraException:  # the grammar's own words: `missing EQUAL at '<EOF>'`
            if "=" in text or i == 0 or "=" not in overrides[i - 1]:
                return
            key, value = overrides[i - 1].split("=", 1)
            words = [value, *overrides[i:]]
            words = words[:next((j for j, w in enumerate(words) if j and "=" in w), len(words))]
            raise UserError(f"{text!r} is not key=value: quote a value that has spaces, "
                            f"e.g. {key}=\"{' '.join(words)}\"") from None
    # A sweep's values are Hydra's to check; each key of the rest must be in the config unless added with `+`.
    kept = [o for o in parsed if not (multirun and o.is_sweep_override())]
    unknown = []
    while True:
        try:
            with composed(config_name, [o.input_line for o in kept]) as cfg:
                break
        except ConfigCompositionException as e:
            match = re.match(r"Could not override '([^']+)'", str(e))
            culprit = next((o for o in kept if match and o.type == OverrideType.CHANGE and o.key_or_group == match[1]
                            and isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError))), None)
            if culprit is None:
                return  # Hydra's own words
            unknown.append(culprit)
            kept.remove(culprit)
    if unknown:
        raise UserError(_unknown_key(cfg, unknown[0].key_or_group, unknown[0].input_line.split("=", 1)[-1]))


def _unknown_key(cfg: DictConfig, key: str, value: str) -> str:
    """What to say of a key the config lacks: the nearest key there is, or the keys of its parent."""
    parts = key.split(".")
    node, depth = cfg, 0
    while depth < len(parts) and isinstance(node, DictConfig) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    if not isinstance(node, DictConfig):
        return f"{'.'.join(parts[:depth])} is a value, not a group of settings: {key} does not exist"
    where = ".".join(parts[:depth])
    known = [str(k) for k in node]
    close = difflib.get_close_matches(parts[depth], known, n=1, cutoff=0.6)
    if close:
        nearest = ".".join([*parts[:depth], close[0], *parts[depth + 1:]])
        return f"{key} is not in the config: did you mean {nearest}={value}?"
    return (f"{key} is not in the config ({where or 'its top level'} has {', '.join(known)}): check the name, "
            f"or add a key the config lacks with +{key}={value}")


# ---- config values ---------------------------------------------------------------------------------


def settings(cls, node, where: str):
    """`cls(**node)` for a config node, or a UserError naming the key that is unknown or invalid."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{where}.{unknown[0]} is not a setting: use one of {', '.join(fields)}")
    for name, f in fields.items():  # nested settings (tuning.lora) are checked as such
        if name in values and isinstance(values[name], dict) and dataclasses.is_dataclass(f.default_factory):
            values[name] = settings(f.default_factory, values[name], f"{where}.{name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


# ---- the model -------------------------------------------------------------------------------------


def tiny_model_path(spec: DictConfig, cache_dir: str) -> str:
    """A random tiny checkpoint made once into `cache_dir`; atomic, so concurrent runs may race safely."""
    from swarmtune.tiny_model import make_tiny_model

    cache_dir = os.path.expanduser(cache_dir)
    path = os.path.join(cache_dir, f"tiny-{spec.family}-{spec.layers}x{spec.hidden}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".making-")
    try:
        make_tiny_model(spec.family, tmp, layers=spec.layers, hidden=spec.hidden)
        os.rename(tmp, path)
    except OSError:
        if not os.path.exists(os.path.join(path, "config.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(model: DictConfig) -> str:
    """The checkpoint to use: `model.path` (checked), or the tiny demo model (made on first use)."""
    if model.path:
        errors.check_source(model.path, "model.path")
        return model.path
    return tiny_model_path(model.tiny, model.cache_dir)


def model_config(model: DictConfig, model_path: str):
    """The checkpoint's config: a missing, unreachable or unsupported model fails here, before any swarm."""
    from swarmtune.models import load_config, parse_dtype

    try:
        parse_dtype(model.dtype)
    except ValueError as e:
        raise UserError(f"model.dtype: {e}") from None
    try:
        return load_config(model_path, revision=model.revision)
    except UserError:
        raise
    except Exception as e:  # transformers' own words: a config it cannot read
        raise UserError(f"cannot read the config of {model_path}: {e}") from None


def num_blocks(config) -> int:
    """The model's transformer blocks, as servers count them."""
    return int(config.num_hidden_layers)


def load_adapter(adapter: str | None, config, revision: str | None):
    """A PEFT-format adapter read (and checked against the model) before any swarm starts."""
    if adapter is None:
        return None
    from swarmtune.adapters import peft_format

    try:
        return peft_format.load_adapter(adapter, config, revision)
    except UserError:
        raise
    except Exception as e:  # the hub's or safetensors' own words
        raise UserError(f"adapter {adapter}: {e}") from None


# ---- the swarm -------------------------------------------------------------------------------------


def load_draft(source: str | None, config, dtype: str):
    """The speculative decoding draft (`generation.draft`): a local causal LM whose vocabulary is the model's.
    Its config is checked before its weights load, and both before any swarm."""
    if source is None:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    from swarmtune.models import parse_dtype

    errors.check_source(source, "generation.draft")
    try:
        draft_config = AutoConfig.from_pretrained(source)
    except Exception as e:
        raise UserError(f"cannot read the config of generation.draft={source}: {e}") from None
    vocab, want = draft_config.get_text_config().vocab_size, config.get_text_config().vocab_size
    if vocab != want:
        raise UserError(f"generation.draft={source} has a vocabulary of {vocab} tokens and the model {want}: "
                        "the draft must share the model's tokenizer")
    return AutoModelForCausalLM.from_pretrained(source, dtype=parse_dtype(dtype)).eval()


def client_settings(swarm: DictConfig):
    """The ClientConfig for `swarm`, its peers checked (none: a local swarm will serve)."""
    from swarmtune.client.config import ClientConfig

    peers = swarm_peers(swarm)
    errors.check_multiaddrs(peers, "swarm.initial_peers")
    return settings(ClientConfig, {**plain(swarm.client), "initial_peers": peers, "dht_prefix": swarm.dht_prefix},
                    "swarm.client")


RANK_ZERO_SWARM = "SWARMTUNE_RANK_ZERO_SWARM"  # [initial peers, DHT prefix] of the embedded swarm rank 0 started


LOCAL_SERVERS = 3  # the embedded swarm's servers when swarm.local_spans is null


def local_spans(spans, num_blocks: int) -> list[tuple[int, int]]:
    """The spans of an embedded swarm: `swarm.local_spans`, checked against the model's `num_blocks` blocks, or
    (null) the blocks split evenly over LOCAL_SERVERS servers."""
    if spans is None:
        count = min(LOCAL_SERVERS, num_blocks)
        bounds = [round(i * num_blocks / count) for i in range(count + 1)]
        return list(zip(bounds[:-1], bounds[1:]))
    found = []
    for span in spans:
        span = list(span) if isinstance(span, (list, tuple, ListConfig)) else span
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
                and 0 <= span[0] < span[1] <= num_blocks):
            raise UserError(f"swarm.local_spans: {span} is not a span of the model's {num_blocks} blocks: give "
                            f"[START, END] with 0 <= START < END <= {num_blocks}, or null to split them evenly")
        found.append(tuple(span))
    served = {block for start, end in found for block in range(start, end)}
    missing = [block for block in range(num_blocks) if block not in served]
    if missing:
        raise UserError(f"swarm.local_spans leave block(s) {', '.join(map(str, missing))} of the model's "
                        f"{num_blocks} without a server: cover every block, or give null to split them evenly")
    return found


def open_swarm(stack: contextlib.ExitStack, swarm: DictConfig, client_config, model_path: str,
               log_dir: str | None, num_blocks: int):
    """`client_config` with the peers of the swarm to use: as configured, the one `swarm up` keeps for this
    model, or an embedded LocalSwarm (of `num_blocks` blocks) whose processes `stack` stops on exit."""
    from swarmtune.local_swarm import LocalSwarm, find_running

    if client_config.initial_peers:
        return client_config
    shared = os.environ.get(RANK_ZERO_SWARM) if int(os.environ.get("LOCAL_RANK", "0")) > 0 else None
    if shared is not None:  # a data-parallel rank that Lightning started: use rank 0's embedded swarm
        peers, prefix = json.loads(shared)
        print(f"Joined the embedded swarm of rank 0 (rank {os.environ['LOCAL_RANK']})", file=sys.stderr, flush=True)
        return dataclasses.replace(client_config, initial_peers=peers, dht_prefix=client_config.dht_prefix or prefix)
    running = find_running(model_path)
    if running is not None:
        print(f"Using the swarm that `python -m swarmtune.swarm up` runs for {model_path} (pid {running['pid']})",
              file=sys.stderr, flush=True)
        peers, prefix = running["initial_peers"], running["dht_prefix"]
    else:
        spans = local_spans(swarm.local_spans, num_blocks)
        local = stack.enter_context(LocalSwarm(model_path, spans=spans, log_dir=log_dir))
        peers, prefix = local.initial_peers, local.dht_prefix
        # The ranks that Lightning's DDP starts later inherit this process's environment: they join this swarm.
        os.environ[RANK_ZERO_SWARM] = json.dumps([peers, prefix])
        stack.callback(os.environ.pop, RANK_ZERO_SWARM, None)
    return dataclasses.replace(client_config, initial_peers=peers, dht_prefix=client_config.dht_prefix or prefix)


def open_tokenizer(model: DictConfig):
    """The tokenizer of `model` (model.tokenizer, or the model's own), read before any swarm starts, so that
    what the data needs of it (a chat template) is checked first."""
    from transformers import AutoTokenizer

    if model.tokenizer:
        errors.check_source(model.tokenizer, "model.tokenizer")
    return AutoTokenizer.from_pretrained(model.tokenizer or resolve_model(model), revision=model.revision)


def open_model(stack: contextlib.ExitStack, cfg: DictConfig, log_dir: str | None, adapter: str | None = None,
               active_adapter: str | None = None, tokenizer=None):
    """(model, tokenizer) for `cfg.model` on `cfg.swarm`; `stack` closes the model (and any embedded swarm).

    Everything that can be checked without the swarm is checked first: the swarm's settings, the
    model, the adapter, the tokenizer (`tokenizer`: one read and checked already by `open_tokenizer`).
    """
    from swarmtune.client.model import SwarmForCausalLM

    client_config = client_settings(cfg.swarm)
    if adapter is not None:
        errors.check_source(adapter, "adapter")
    model_path = resolve_model(cfg.model)
    config = model_config(cfg.model, model_path)
    loaded = load_adapter(adapter, config, cfg.model.revision)
    if tokenizer is None:
        tokenizer = open_tokenizer(cfg.model)
    client_config = open_swarm(stack, cfg.swarm, client_config, model_path, log_dir, num_blocks(config))
    model = SwarmForCausalLM.from_pretrained(model_path, client_config=client_config, dtype=cfg.model.dtype,
                                             revision=cfg.model.revision, active_adapter=active_adapter)
    stack.callback(model.close)
    if loaded is not None:
        model.attach_adapter(loaded)
    return model, tokenizer


def swarm_peers(swarm: DictConfig) -> list[str]:
    """swarm.initial_peers; if they are to come from an environment variable that is not set, or must be given
    and are not, a UserError saying how to give them."""
    example = f"'[{errors.MADDR_EXAMPLE}]'"
    try:
        return peer_list(swarm.initial_peers)
    except MissingMandatoryValue:
        raise UserError(f"this swarm's peers must be given: swarm.initial_peers={example}") from None
    except InterpolationResolutionError:
        raw = OmegaConf.to_container(swarm, resolve=False).get("initial_peers")
        variable = re.fullmatch(r"\$\{oc\.env:(\w+)\}", str(raw))
        if variable is None:
            raise
        raise UserError(f"swarm.initial_peers come from the environment variable {variable[1]}, which is not set: "
                        f"export {variable[1]}='/ip4/.../tcp/31337/p2p/...' (the swarm's bootstrap peers, space "
                        f"separated), or give swarm.initial_peers={example}") from None


def peer_list(peers) -> list[str]:
    """Multiaddrs from a list, or from one string of them (as an environment variable holds them)."""
    if isinstance(peers, str):
        return peers.replace(",", " ").split()
    return list(peers or [])


@contextlib.contextmanager
def config_context() -> Iterator[None]:
    """Hydra's compose API over swarmtune's configs, wherever they are (for commands that are not Hydra apps,
    and tests)."""
    from hydra import initialize_config_dir, initialize_config_module

    path = config_path()
    init = initialize_config_module(path[len("pkg://"):], version_base=None) if path.startswith("pkg://") \
        else initialize_config_dir(path, version_base=None)
    with init:
        yield


@contextlib.contextmanager
def composed(config_name: str, overrides: list[str]) -> Iterator[DictConfig]:
    """A primary config composed with Hydra's compose API."""
    from hydra import compose

    with config_context():
        yield compose(config_name, overrides=overrides)
