"""
Config overrides, nanoGPT style. A script defines its config as global variables, then runs
    exec(open('configurator.py').read())
which reads the command line, e.g.
    python train.py configs/pretrain.py configs/tiny.py --learning_rate=3e-4 --compile=False
1. each --key=value is read with ast.literal_eval (a string if that fails) and set first;
2. each config file (a plain argument ending in .py) is then executed in order, as Python, with
   the values so far visible, so an overlay can derive from them (`warmup_iters = max_iters // 20`
   follows --max_iters); a file's assignment to a name set on the command line is ignored: the
   command line always wins.
A plain argument that is not a .py file is an input, for a script with a `sources` list
(prepare.py); elsewhere it is an error. Only names the script already defines may be set, and a
value must keep the type of the default (an int is accepted for a float; anything where the default
is None). --help prints the settings with their defaults and comments; --print_config prints the
effective configuration (as a config file, floats rounded for display) and exits. Leaves `config`,
the final {name: value}, `config_defaults`, the script's own values, and shown(value), a value
as a user would write it.
Yes, it execs files and rewrites globals(): that is the hack, and it keeps every script flat.
"""
import ast as _ast
import builtins as _builtins  # train.py has a config variable named compile
import difflib as _difflib
import os as _os
import sys as _sys
import tokenize as _tokenize
import traceback as _traceback

_SIMPLE_TYPES = (int, float, bool, str, list, tuple, dict, type(None))
_defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, _SIMPLE_TYPES)}


def _config_error(message):
    _sys.exit(f"config error: {message}")


def _checked(key, value, origin):
    if key not in _defaults:
        close = _difflib.get_close_matches(key, list(_defaults), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        _config_error(f"unknown config key '{key}' in {origin}{hint}")
    default = _defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if type(value) is not type(default):
        _config_error(f"{key} expects {type(default).__name__} (like the default {default!r}), "
                      f"got {type(value).__name__} {value!r} from {origin}")
    return value


def _print_help():
    """The script's docstring, then each setting, its default and the comment beside it in the source."""
    script = _sys.argv[0]
    comments, doc = {}, ""
    if _os.path.isfile(script):
        with open(script, "rb") as f:
            tokens = list(_tokenize.tokenize(f.readline))
        name, column = None, 0
        for i, t in enumerate(tokens):
            starts_line = tokens[i - 1].type in (_tokenize.NEWLINE, _tokenize.NL, _tokenize.INDENT, _tokenize.DEDENT,
                                                 _tokenize.ENCODING)
            if t.type == _tokenize.NAME and t.string == "exec" and starts_line:
                break  # the settings end where this file is run
            if t.type == _tokenize.NAME and starts_line and i + 1 < len(tokens) and tokens[i + 1].string == "=":
                name, column = (t.string, t.start[1]) if t.string in _defaults else (None, 0)
            elif t.type == _tokenize.COMMENT and name and (t.start[0] == tokens[i - 1].end[0] or t.start[1] > column):
                comments[name] = (comments.get(name, "") + " " + t.string.lstrip("# ")).strip()
            elif t.type == _tokenize.COMMENT:
                name = None
        doc = _ast.get_docstring(_ast.parse(open(script).read())) or ""
    print(doc.strip() + "\n\nSettings (config files and --key=value):")
    for key, default in _defaults.items():
        print(f"  --{key}={shown(default)}" + (f"\n        {comments[key]}" if key in comments else ""))
    print("  --print_config\n        print the effective configuration (as a config file) and exit")
    _sys.exit(0)


def shown(value):
    """A value as a user would write it: floats to 12 significant digits (0.003, not 0.0029999999999999996)."""
    if isinstance(value, float):
        return repr(float(f"{value:.12g}"))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{shown(k)}: {shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(shown(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


class _CommandLineWins(dict):
    """A config file's local namespace: its assignments go into `target`, except to the names set on
    the command line, so the file computes with the command line's values throughout."""

    def __init__(self, target, pinned):
        super().__init__()
        self.target, self.pinned = target, pinned

    def __setitem__(self, key, value):
        if key not in self.pinned:
            self.target[key] = value


def _run_config_file(path, pinned):
    namespace = {k: globals()[k] for k in _defaults}
    try:
        with open(path) as f:
            exec(_builtins.compile(f.read(), path, "exec"), namespace, _CommandLineWins(namespace, pinned))
    except SyntaxError as e:
        _config_error(f"{path}:{e.lineno}: SyntaxError: {e.msg}")
    except SystemExit as e:  # a config file that exits would end the run as if it had succeeded
        _config_error(f"{path} called sys.exit({e.code!r}): a config file only sets variables")
    except Exception as e:  # the line of the config file that raised, in one line
        line = next((frame.lineno for frame in reversed(_traceback.extract_tb(e.__traceback__))
                     if frame.filename == path), "?")
        _config_error(f"{path}:{line}: {type(e).__name__}: {e}")
    for key, value in namespace.items():
        # modules, functions and _private names in a config file are its own helpers, not config
        if key.startswith("_") or not isinstance(value, _SIMPLE_TYPES) or key in pinned:
            continue
        if key not in _defaults or value is not globals()[key]:
            globals()[key] = _checked(key, value, path)


_arguments = _sys.argv[1:]
if "--help" in _arguments or "-h" in _arguments:
    _print_help()
_print_config = "--print_config" in _arguments
_pinned = set()
for _arg in _arguments:  # 1. the command line's values, first
    if _arg.startswith("--") and _arg != "--print_config":
        _key, _eq, _text = _arg[2:].partition("=")
        if not _eq:
            _config_error(f"'{_arg}' has no value: write --{_key}=VALUE")
        try:
            _value = _ast.literal_eval(_text)
        except (ValueError, SyntaxError):
            _value = _text
        if isinstance(_defaults.get(_key), str) and not isinstance(_value, str):
            _value = _text  # --out_dir=123 means the string '123'
        globals()[_key] = _checked(_key, _value, f"--{_key}")
        _pinned.add(_key)
for _arg in _arguments:  # 2. config files, in order; 3. inputs
    if _arg.startswith("--"):
        continue
    if _arg.endswith(".py"):
        if not _os.path.isfile(_arg):
            _config_error(f"config file not found: {_arg}")
        _run_config_file(_arg, _pinned)
    elif isinstance(_defaults.get("sources"), list) and "sources" not in _pinned:
        sources = [*sources, _arg]  # noqa: F821 (the script's own list)
    else:
        _config_error(f"unexpected argument '{_arg}': config files end in .py, settings are --key=value "
                      f"(see --help)")

config = {k: globals()[k] for k in _defaults}
config_defaults = dict(_defaults)
if _print_config:
    print("\n".join(f"{k} = {shown(v)}" for k, v in config.items()))
    _sys.exit(0)
