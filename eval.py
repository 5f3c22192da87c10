"""
Evaluate a model trained by train.py (SUBLLM, its LLaMA twin, a recurrent structure) on the benchmarks of
lm-evaluation-harness (the `lm-eval` package: pip install -r requirements-eval.txt), as the paper compares SUBLLM
with LLaMA: few-shot accuracy on MMLU, BBH and AGIEval.

    python eval.py --out_dir=out-subllm-250m --tasks=paper              # MMLU 5-shot, BBH 3-shot, AGIEval 5-shot
    python eval.py --out_dir=out-subllm-250m --tasks=hellaswag,arc_easy,arc_challenge,piqa --batch_size=16
    python eval.py --out_dir=out-tiny --tasks=my_task --include_path=my_tasks/ --limit=100 --json=results.json

It prints lm-eval's table and, with --json, writes lm-eval's results. A task's data set comes from the Hugging Face
hub on first use (then from the cache, ~/.cache/huggingface). `--tasks=paper` runs lm-eval's `mmlu` 5-shot,
`bbh_fewshot` 3-shot (answers only, no chain of thought) and `agieval_en` 5-shot, one after another since their
shot counts differ; the README says why these variants.

The model answers lm-eval's three kinds of request (HarnessLM): loglikelihood (the log-probability of an answer
after its question: multiple choice), loglikelihood_rolling (of whole documents: perplexity) and generate_until
(greedy decoding up to a task's stop strings). Scoring runs in batches of windows sorted by length, right-padded:
the eval-mode selection of a level (`score > 0`, token by token) is causal like attention, so padding after a
sequence changes none of its logits. From Python: simple_evaluate(model=HarnessLM(*load_model('out-tiny')), ...).
(HarnessLM is not registered by name with lm-eval's register_model: lm-eval's command line never imports this file,
so a registered name could not reach it there.)
"""
import os
import time
from contextlib import nullcontext
from json import dump

import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import check_ranges, configure, first_line
from generate import Decoder
from run_dir import load_trained

# -----------------------------------------------------------------------------
out_dir = 'out'             # reads out_dir/ckpt.pt
tasks = 'hellaswag'         # lm-eval task or group names, comma-separated; 'paper': MMLU 5-shot, BBH 3-shot, AGIEval
                            # 5-shot (`lm-eval ls tasks` lists the names)
num_fewshot = -1            # examples before each question; -1: the task's own default (0 for most)
batch_size = 16             # sequences per forward pass when scoring; generation decodes one request at a time
limit = 0                   # at most this many examples per task (0: all): a quick look, not a score
include_path = ''           # a folder of your own lm-eval task YAML files
json = ''                   # write lm-eval's results (all tasks) to this path as JSON
device = 'auto'             # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'              # 'auto' (bfloat16 if the GPU has it, else float16; float32 on CPU) or one of those
# -----------------------------------------------------------------------------
PAPER_TASKS = [('mmlu', 5), ('bbh_fewshot', 3), ('agieval_en', 5)]  # the paper's table: (lm-eval name, shots)
PIP_HINT = "eval.py needs lm-evaluation-harness: pip install -r requirements-eval.txt"

if __name__ == '__main__':  # the settings are read when run as a script; the tests import the code below
    configure(globals())  # --key=value (configurator.py); --help works without lm-eval installed
    check_ranges(globals(), {'num_fewshot': ('[-1, inf)', ' (-1: the task\'s default)'), 'batch_size': '[1, inf)',
                             'limit': ('[0, inf)', ' (0: every example)')})

try:
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table
except ImportError:
    raise SystemExit(PIP_HINT) from None


def load_model(out_dir, device='cpu'):
    """The SubLLM of out_dir/ckpt.pt in eval mode on device, and the tokenizer of its data (the checkpoint's meta);
    one line when the checkpoint is missing or does not fit this model.py (as in sample.py)."""
    model, tok, checkpoint, ckpt_path = load_trained(out_dir)
    print(f"{ckpt_path}: iter {checkpoint.get('iter_num')}, {model.get_num_params() / 1e6:.2f}M parameters, "
          f"structure {model.config.structure}, block_size {model.config.block_size}, {tok.name} tokens")
    return model.to(device).eval(), tok


def score_windows(tokens, start, block_size):
    """Windows (first, last, n) that score tokens[start:] (start >= 1), each token once: the model reads
    tokens[first:last] (at most block_size) and its last n predictions are the log-probabilities of tokens[last - n +
    1:last + 1]. A window scores up to block_size tokens, and the last window reads a full block_size of context, as
    lm-eval's rolling windows do; one window when the tokens to score fit the block (a long context keeps its end)."""
    windows = []
    for i in range(start, len(tokens), block_size):  # score tokens[i:j]
        j = min(i + block_size, len(tokens))
        windows.append((max(0, j - 1 - block_size), j - 1, j - i))
    return windows


class HarnessLM(LM):
    """A SubLLM (any structure) and its tokenizer as an lm-eval model. autocast: a context for the forward passes
    (bf16 autocast on a GPU)."""

    def __init__(self, model, tok, batch_size=16, autocast=nullcontext()):
        super().__init__()
        self.model, self.tok, self.batch_size, self.autocast = model.eval(), tok, batch_size, autocast
        self.block_size = model.config.block_size
        self.model_device = model.lm_head.weight.device  # (lm-eval 0.4.13 has a read-only `device`)
        self.timing = {}  # request kind -> (requests, seconds): the throughput lines

    def encode_pair(self, context, continuation):
        """(context ids, continuation ids) as lm-eval's own models split them: trailing whitespace of the context
        goes to the continuation, the pair is encoded whole and split where the context's own encoding ends (BPE
        merges across the boundary stay as they would be in the text). An empty context is the end-of-text token."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, context_ids = self.tok.encode(context + continuation), self.tok.encode(context)
        if not context_ids:
            return [self.tok.eot_token], whole
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm=False):
        """(context, continuation) -> (log P(continuation | context), whether greedy decoding would produce it)."""
        pairs = [self.encode_pair(*r.args) for r in requests]
        return self.score([(c + x, len(c)) for c, x in pairs], 'loglikelihood', disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """(text,) -> log P(text), after the end-of-text token, in windows of block_size."""
        docs = [([self.tok.eot_token] + self.tok.encode(r.args[0]), 1) for r in requests]
        return [logprob for logprob, _ in self.score(docs, 'loglikelihood_rolling', disable_tqdm)]

    @torch.no_grad()
    def score(self, sequences, desc, disable_tqdm=False):
        """sequences: (tokens, start) -> per sequence (sum of log P(tokens[i] | tokens[:i]) for i >= start, whether
        every one of those tokens is the argmax). The windows of all sequences (score_windows) run in batches, longest
        first (similar lengths share a batch: little padding), each right-padded to the longest of its batch."""
        t0 = time.perf_counter()
        windows = [(s, *w) for s, (tokens, start) in enumerate(sequences)
                   for w in score_windows(tokens, start, self.block_size)]
        windows.sort(key=lambda w: w[2] - w[1], reverse=True)
        logprob, greedy = [0.0] * len(sequences), [True] * len(sequences)
        progress = tqdm(total=len(windows), desc=desc, unit='window', disable=disable_tqdm)
        for b in range(0, len(windows), self.batch_size):
            batch = windows[b:b + self.batch_size]
            T = batch[0][2] - batch[0][1]  # the longest
            x = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T) inputs, padded with token 0 after the end
            y = torch.full((len(batch), T), -1, dtype=torch.long)  # (B, T) targets where scored, else -1
            for row, (s, first, last, n) in enumerate(batch):
                tokens = sequences[s][0]
                x[row, :last - first] = torch.tensor(tokens[first:last])
                y[row, last - first - n:last - first] = torch.tensor(tokens[last - n + 1:last + 1])
            x, y = x.to(self.model_device), y.to(self.model_device)
            with self.autocast:
                logits, _ = self.model(x, y)  # (B, T, V): with targets the model returns every position's logits
            scored = y >= 0
            logits, targets = logits[scored].float(), y[scored]  # (N, V), (N,): the scored positions only
            token_logprobs = F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
            is_argmax = logits.argmax(dim=-1) == targets
            rows = scored.nonzero()[:, 0].tolist()  # the batch row of each scored position
            for row, lp, hit in zip(rows, token_logprobs.tolist(), is_argmax.tolist()):
                s = batch[row][0]
                logprob[s] += lp
                greedy[s] = greedy[s] and hit
            progress.update(len(batch))
        progress.close()
        self.timed(desc, len(sequences), t0)
        return list(zip(logprob, greedy))

    def generate_until(self, requests, disable_tqdm=False):
        """(context, gen_kwargs) -> the greedy continuation, cut before the first of gen_kwargs['until'] (stop
        strings) and the end-of-text token, at most max_gen_toks tokens (lm-eval's default 256), and no further than
        block_size. A prompt too long for block_size keeps its end."""
        t0 = time.perf_counter()
        answers = []
        for request in tqdm(requests, desc='generate_until', disable=disable_tqdm):
            context, kwargs = request.args
            if kwargs.get('do_sample'):
                raise SystemExit(f"eval.py decodes greedily, but a task asks for sampling ({kwargs}): leave that "
                                 f"task out, or override its generation_kwargs in your own YAML (--include_path)")
            until = kwargs.get('until') or []
            until = [until] if isinstance(until, str) else until
            max_new = min(kwargs.get('max_gen_toks', 256), self.block_size - 1)
            ids = (self.tok.encode(context) or [self.tok.eot_token])[-(self.block_size - max_new):]
            new = self.greedy(ids, max_new, until)
            text = self.tok.decode([t for t in new if t < self.tok.vocab_size])  # padded vocab ids: never trained
            answers.append(min((text.split(s)[0] for s in until), key=len, default=text))
        self.timed('generate_until', len(requests), t0)
        return answers

    def timed(self, kind, n, t0):
        requests, seconds = self.timing.get(kind, (0, 0.0))
        self.timing[kind] = (requests + n, seconds + time.perf_counter() - t0)

    @torch.no_grad()
    def greedy(self, ids, max_new, until):
        """Up to max_new tokens after ids, each the argmax, through the per-level KV cache (as generate.py with
        top_k=1 does); stops early at the end-of-text token or once the text holds a stop string."""
        model, new = self.model, []
        with self.autocast:  # the cache takes autocast's dtype (bf16 on a GPU), as in generate.py
            decoder = Decoder(model, 1, len(ids) + max_new)
            try:
                logits, _ = decoder(torch.tensor([ids], device=self.model_device))  # the prefill: (1, 1, V)
                for i in range(max_new):
                    token = logits[0, -1].argmax()
                    if token.item() == self.tok.eot_token:
                        break
                    new.append(token.item())
                    if until and any(s in self.tok.decode([t for t in new if t < self.tok.vocab_size]) for s in until):
                        break
                    if i < max_new - 1:
                        logits, _ = decoder(token.view(1, 1))
            finally:
                decoder.close()
        return new


def merge(results, more):
    """lm-eval's results of two simple_evaluate calls (their tasks differ) as one: per-task entries side by side."""
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(results.get(key), dict) and key != 'config':
            results[key].update(value)
    return results


def main():
    global device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device_type = device.split(':')[0]
    if device_type not in ('cpu', 'cuda', 'mps'):
        raise SystemExit(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device={device}, but this torch sees no CUDA GPU: use --device=cpu")
    dtype_name = dtype if dtype != 'auto' else 'float32' if device_type != 'cuda' else \
        'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if dtype_name not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    autocast = nullcontext() if dtype_name == 'float32' else torch.autocast(device_type, getattr(torch, dtype_name))

    # one simple_evaluate call per shot count: (task names, shots; None: each task's default)
    names = [t.strip() for t in tasks.split(',') if t.strip()]
    if 'paper' in names and num_fewshot != -1:
        raise SystemExit("--tasks=paper runs each benchmark at the paper's shot count: leave --num_fewshot out")
    runs = [([name], shots) for name, shots in PAPER_TASKS] if 'paper' in names else []
    others = [n for n in names if n != 'paper']
    if others:
        runs.append((others, None if num_fewshot == -1 else num_fewshot))
    if not runs:
        raise SystemExit("--tasks is empty: give lm-eval task names, e.g. --tasks=hellaswag,arc_easy, or paper")
    if include_path and not os.path.isdir(include_path):
        raise SystemExit(f"--include_path={include_path} is not a folder (of lm-eval task YAML files)")
    if json and not os.path.isdir(os.path.dirname(os.path.abspath(json))):
        raise SystemExit(f"--json={json}: there is no folder {os.path.dirname(os.path.abspath(json))} to write it in")
    lm = HarnessLM(*load_model(out_dir, device), batch_size=batch_size, autocast=autocast)
    needed = [n for run_tasks, _ in runs for n in run_tasks]
    own = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if own and set(needed) <= set(own.all_tasks):
        task_manager = own  # only your own tasks: lm-eval's need not be indexed (10 s)
    else:
        task_manager = TaskManager(include_path=include_path or None)
    unknown = [n for n in needed if n not in task_manager.all_tasks and not os.path.isfile(n)]
    if unknown:
        raise SystemExit(f"unknown task {', '.join(unknown)}: `lm-eval ls tasks` lists lm-eval's names; "
                         f"your own YAML files go in a folder given as --include_path")

    results = None
    for run_tasks, shots in runs:
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=run_tasks, num_fewshot=shots, limit=limit or None,
                                          task_manager=task_manager, log_samples=False)
        except OSError as e:  # datasets' ConnectionError (offline, the hub down), a task's missing data file
            raise SystemExit(f"a task's data could not be loaded ({type(e).__name__}: {first_line(e)}): the data sets "
                             f"come from the Hugging Face hub on first use, then from its cache") from None
        results = out if results is None else merge(results, out)
    print(make_table(results))
    if results.get('groups'):
        print(make_table(results, 'groups'))
    for kind, (n, seconds) in lm.timing.items():
        speed = f"{n / seconds:.1f} requests/s" if seconds > 0 else "too fast to time"
        print(f"{kind}: {n} requests in {seconds:.1f} s, {speed} (batch_size {batch_size}, {device})")
    if json:
        tmp = json + '.tmp'
        with open(tmp, 'w') as f:
            dump(results, f, indent=2, default=handle_non_serializable)
        os.replace(tmp, json)  # atomic: a crash leaves the old file or none, never half a file
        print(f"wrote {json}")


if __name__ == '__main__':
    main()
