"""
The settings parser of train.py, sample.py and bench.py: nanoGPT's "poor man's configurator", with types.
A script's settings are the plain values (bool, int, float, str, tuple) it assigns at module level, lower case,
before it calls configure(globals()). Then

    python train.py config/tiny_cpu.py --batch_size=32 --keep_ratio="(0.64, 0.5)"

runs the config file (Python that assigns some of the settings), then applies each --key=value in order. A value
takes the type of the setting's default (an int is fine for a float); a mistake ends the run with one line that
says what to do. --help prints the script's docstring and every setting with its default and its comment.
"""
import os
import re
import sys
import types
from ast import literal_eval


def settings_of(namespace):
    """The settings among a script's globals: plain lower-case values (imports, functions and CONSTANTS aside)."""
    return [k for k, v in namespace.items() if not k.startswith('_') and k.islower()
            and isinstance(v, (bool, int, float, str, tuple))]


def comments_of(path, keys):
    """{key: its comment} from the script's source: the text after '#' on the line that assigns it, and on the
    comment-only lines right below it that are indented past the start of the line."""
    lines = open(path).read().splitlines() if path and os.path.exists(path) else []
    comments = {}
    for i, line in enumerate(lines):
        m = re.match(r"(\w+) *=.*?  # ?(.*)$", line)
        if m and m.group(1) in keys and m.group(1) not in comments:
            text = [m.group(2)]
            for more in lines[i + 1:]:
                if not re.match(r" +# ", more):
                    break
                text.append(more.strip()[2:])
            comments[m.group(1)] = ' '.join(text)
    return comments


def print_help(namespace, keys):
    comments = comments_of(namespace.get('__file__'), keys)
    print((namespace.get('__doc__') or '').strip() + '\n\nsettings (--key=default, and what it does):')
    width = max(len(f"--{k}={namespace[k]!r}") for k in keys)
    for k in keys:
        flag = f"--{k}={namespace[k]!r}"
        print(f"  {flag:<{width}}  {comments.get(k, '')}".rstrip())


def checked(namespace, key, value, source, tuples):
    """value with the type of the key's default, or a one-line SystemExit. Keys in `tuples` (float settings) also
    take a tuple of numbers."""
    default = namespace[key]
    value = tuple(value) if isinstance(value, list) else value
    numbers = (int, float)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = (isinstance(value, numbers) and not isinstance(value, bool)) or (
            key in tuples and isinstance(value, tuple) and all(isinstance(r, numbers) for r in value))
        value = float(value) if ok and not isinstance(value, tuple) else value
    else:
        ok = type(value) is type(default)
    if not ok:
        expected = 'True or False' if isinstance(default, bool) else type(default).__name__
        raise SystemExit(f"--{key} expects {expected}, got {value!r} ({source})")
    return value


def configure(namespace, argv=None, tuples=()):
    """Override the settings in `namespace` (a script's globals()) from config files and --key=value flags in
    argv (default: sys.argv[1:]). Returns the set of the keys given explicitly."""
    argv = sys.argv[1:] if argv is None else argv
    keys = settings_of(namespace)
    given = set()
    for arg in argv:
        if arg in ('-h', '--help'):
            print_help(namespace, keys)
            sys.exit(0)
        if not arg.startswith('--'):  # a config file: python that assigns settings
            if not os.path.isfile(arg):
                raise SystemExit(f"config file {arg!r} not found (settings are given as --key=value)")
            defined = {'__file__': arg}
            try:
                exec(open(arg).read(), defined)
            except Exception as e:
                raise SystemExit(f"config file {arg!r} fails: {type(e).__name__}: {e}") from None
            settings = {k: v for k, v in defined.items()  # every plain value it defines (imports, helpers aside)
                        if not k.startswith('_') and not callable(v) and not isinstance(v, types.ModuleType)}
            source = f"in {arg}"
        else:
            key, eq, value = arg[2:].partition('=')
            if not eq:
                raise SystemExit(f"bad argument {arg!r}: use --key=value (--help lists the settings)")
            if key in keys and not isinstance(namespace[key], str):
                try:
                    value = literal_eval(value)
                except (ValueError, SyntaxError):
                    pass  # stays a string, and the type check says what was expected
            settings, source = {key: value}, f"from {arg}"
        for key, value in settings.items():
            if key not in keys:
                raise SystemExit(f"unknown setting {key!r} ({source}); valid keys: {', '.join(keys)}")
            namespace[key] = checked(namespace, key, value, source, tuples)
            given.add(key)
    return given
