"""
Config overrides, nanoGPT style. A script defines its config as global variables, then runs
    exec(open('configurator.py').read())
which applies, in order:
    python train.py configs/pretrain.py configs/tiny.py --learning_rate=3e-4 --compile=False
1. each config file named on the command line: Python, executed with the current config values
   visible (so an overlay can say `out_dir = out_dir + '-tiny'`);
2. each --key=value: the value is read with ast.literal_eval, or taken as a string if that fails.
Only names the script already defines may be set, and a value must keep the type of the default
(an int is accepted for a float; None is accepted where the default is None, and anything where
the default is None). Leaves `config`, the final {name: value} dict, for logging and checkpoints.
"""
import ast as _ast
import builtins as _builtins  # train.py has a config variable named compile
import difflib as _difflib
import os as _os
import sys as _sys

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


for _arg in _sys.argv[1:]:
    if not _arg.startswith("--"):
        if not _os.path.isfile(_arg):
            _config_error(f"config file not found: {_arg}")
        _namespace = {k: globals()[k] for k in _defaults}
        with open(_arg) as _f:
            exec(_builtins.compile(_f.read(), _arg, "exec"), _namespace)
        for _key, _value in _namespace.items():
            # modules, functions and _private names in a config file are its own helpers, not config
            if _key.startswith("_") or not isinstance(_value, _SIMPLE_TYPES):
                continue
            if _key not in _defaults or _value is not globals()[_key]:
                globals()[_key] = _checked(_key, _value, _arg)
    else:
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

config = {k: globals()[k] for k in _defaults}
