"""
The settings parser of train.py, sample.py and bench.py: nanoGPT's "poor man's configurator", with types.
A script's settings are the plain values (bool, int, float, str, tuple) it assigns at module level, lower case,
before it calls configure(globals()). Then

    python train.py config/tiny_cpu.py --batch_size=32 --keep_ratio="(0.64, 0.5)"

runs the config file (Python that assigns some of the settings), then applies each --key=value in order. A value
takes the type of the setting's default (an int is fine for a float); a mistake ends the run with one line that
says what to do. --help prints the script's docstring and every setting with its default and its comment.
check_ranges() then checks each numeric setting against its valid range, up front, with the same one-line errors.
prepare.py's settings are the keyword arguments of its prepare(): function_namespace() makes them a namespace.
resolve_device() turns the device and dtype settings into what this machine runs.
"""
import inspect
import os
import re
import sys
import textwrap
import types
from ast import literal_eval


def settings_of(namespace):
    """The settings among a script's globals: plain lower-case values (imports, functions and CONSTANTS aside)."""
    return [k for k, v in namespace.items() if not k.startswith('_') and k.islower()
            and isinstance(v, (bool, int, float, str, tuple))]


def comments_of(text, keys):
    """{key: its comment} from source text: the text after '#' on the line that assigns it (`key = value  # ...`
    at the start of a line), and on the comment-only lines right below it that are indented past its start."""
    lines = text.splitlines()
    comments = {}
    for i, line in enumerate(lines):
        m = re.match(r"(\w+) *=.*?  # ?(.*)$", line)
        if m and m.group(1) in keys and m.group(1) not in comments:
            parts = [m.group(2)]
            for more in lines[i + 1:]:
                if not re.match(r" +# ", more):
                    break
                parts.append(more.strip()[2:])
            comments[m.group(1)] = ' '.join(parts)
    return comments


def print_help(namespace, keys):
    path = namespace.get('__file__')
    comments = namespace.get('__comments__') or comments_of(open(path).read() if path and os.path.isfile(path) else '',
                                                            keys)
    print((namespace.get('__doc__') or '').strip() + '\n\nsettings (--key=default, and what it does):')
    width = max(len(f"--{k}={namespace[k]!r}") for k in keys)
    for k in keys:
        flag = f"--{k}={namespace[k]!r}"
        print(f"  {flag:<{width}}  {comments.get(k, '')}".rstrip())


def checked(namespace, key, value, source, tuples, error=SystemExit, text=None):
    """value with the type of the key's default, or a one-line error (showing text, the value as it was typed, if
    given). Keys in `tuples` (float settings) also take a tuple of numbers; an int setting also takes a whole
    float (--max_tokens=1e9)."""
    default = namespace[key]
    value = tuple(value) if isinstance(value, list) else value
    numbers = (int, float)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = (isinstance(value, numbers) and not isinstance(value, bool)) or (
            key in tuples and isinstance(value, tuple) and all(isinstance(r, numbers) for r in value))
        value = float(value) if ok and not isinstance(value, tuple) else value
    elif isinstance(default, int) and isinstance(value, float) and value.is_integer():
        ok, value = True, int(value)
    else:
        ok = type(value) is type(default)
    if not ok:
        expected = 'True or False' if isinstance(default, bool) else type(default).__name__
        raise error(f"--{key} expects {expected}, got {value if text is None else text!r} ({source})")
    return value


def configure(namespace, argv=None, tuples=(), error=SystemExit):
    """Override the settings in `namespace` (a script's globals()) from config files and --key=value flags in
    argv (default: sys.argv[1:]). Returns the set of the keys given explicitly. A mistake raises error (a
    SystemExit, or a subclass of it) with a one-line message."""
    argv = sys.argv[1:] if argv is None else argv
    keys = settings_of(namespace)
    given = set()
    for arg in argv:
        if arg in ('-h', '--help'):
            print_help(namespace, keys)
            sys.exit(0)
        if not arg.startswith('--'):  # a config file: python that assigns settings
            if not os.path.isfile(arg):
                raise error(f"config file {arg!r} not found (settings are given as --key=value)")
            defined = {'__file__': arg}
            try:
                exec(open(arg).read(), defined)
            except Exception as e:
                raise error(f"config file {arg!r} fails: {type(e).__name__}: {first_line(e)}") from None
            text = None
            settings = {k: v for k, v in defined.items()  # every plain value it defines (imports, helpers aside)
                        if not k.startswith('_') and not callable(v) and not isinstance(v, types.ModuleType)}
            source = f"in {arg}"
        else:
            key, eq, value = arg[2:].partition('=')
            if not eq:
                raise error(f"bad argument {arg!r}: use --key=value (--help lists the settings)")
            text = value
            if key in keys and not isinstance(namespace[key], str):
                try:
                    value = literal_eval(value)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    pass  # stays a string, and the type check says what was expected
            settings, source = {key: value}, f"from {arg}"
        for key, value in settings.items():
            if key not in keys:
                raise error(f"unknown setting {key!r} ({source}); valid keys: {', '.join(keys)}")
            namespace[key] = checked(namespace, key, value, source, tuples, error, text)
            given.add(key)
    return given


def first_line(e, limit=200):
    """An exception's message, its first line, shortened: for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def check_ranges(namespace, ranges, error=SystemExit):
    """ranges: {key: interval} or {key: (interval, note)}, interval a string such as '[1, inf)', '(0, inf)' or
    '[0, 1)' (inf for no bound). The first setting out of its range ends the run with one line, e.g.
    "--eval_interval must be at least 1 (iterations between evals), got 0"."""
    for key, rule in ranges.items():
        interval, note = rule if isinstance(rule, tuple) else (rule, '')
        low, high = (float(b) for b in interval[1:-1].split(','))
        value = namespace[key]
        values = value if isinstance(value, tuple) else (value,)
        if all((low <= v if interval[0] == '[' else low < v) and (v <= high if interval[-1] == ']' else v < high)
               for v in values):
            continue
        show = lambda b: f"{int(b)}" if b.is_integer() else f"{b:g}"
        if high == float('inf'):
            must = f"at least {show(low)}" if interval[0] == '[' else f"> {show(low)}"
        elif interval[0] == '[' and interval[-1] == ']':
            must = f"between {show(low)} and {show(high)}"
        else:
            must = f"in {interval[0]}{show(low)}, {show(high)}{interval[-1]}"
        raise error(f"--{key} must be {must}{note}, got {value!r}")


def function_namespace(fn):
    """A namespace for configure() from a function's keyword arguments: their defaults, the docstring of its
    module, and for --help the comment on each argument's line (a signature written one argument per line:
    `name=default,  # what it does`)."""
    params = inspect.signature(fn).parameters
    namespace = {k: p.default for k, p in params.items()}
    source = inspect.getsource(fn)
    signature = source[source.index('(') + 1:source.index('):')]  # the lines of the arguments
    namespace.update(__doc__=sys.modules[fn.__module__].__doc__, __file__=inspect.getsourcefile(fn),
                     __comments__=comments_of(textwrap.dedent(signature.partition('\n')[2]), list(params)))
    return namespace


def resolve_device(device, dtype):
    """The device and dtype settings of train.py and sample.py, checked against this machine: 'auto' becomes cuda
    when there is a GPU (else cpu), and bfloat16 where the GPU has it (else float16; float32 off the GPU). Returns
    (device, device_type, dtype), device_type one of cpu, cuda, mps; a setting that cannot run here is one line."""
    import torch  # here, so that the settings parser does not need torch
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
    if device_type not in ('cpu', 'cuda', 'mps') or not re.fullmatch(r'[a-z]+(:\d+)?', device):
        raise SystemExit(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device={device}, but this torch ({torch.__version__}) sees no CUDA GPU: use --device=cpu, "
                         f"or --device=auto (the GPU when there is one)")
    if device_type == 'cuda' and ':' in device and int(device.split(':')[1]) >= torch.cuda.device_count():
        raise SystemExit(f"--device={device}, but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise SystemExit("--device=mps, but this torch sees no Apple GPU (MPS): use --device=cpu")
    if dtype == 'auto':
        dtype = 'float32' if device_type != 'cuda' else 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"--dtype must be one of auto, float32, bfloat16, float16, got {dtype!r}")
    if dtype == 'bfloat16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise SystemExit("--dtype=bfloat16, but this GPU does not support it: use --dtype=float16 (or auto)")
    return device, device_type, dtype
