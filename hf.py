"""
Hugging Face LLaMA models in and out: nanoGPT's from_pretrained for this project. Our LLaMA baseline computes what
transformers' LlamaForCausalLM computes (the same RoPE convention, first and second half of each head; the same
RMSNorm and SwiGLU), so a LLaMA-architecture model (SmolLM2, TinyLlama, Llama 3.2, ...) loads here weight for weight,
and a SUBLLM can be made from it: the LLaMA's blocks in order, levels around the middle ones.

    python hf.py --hf_model=DIR --out_dir=out-smollm             # DIR -> out_dir/ckpt.pt: sample.py, eval.py read it
    python hf.py --out_dir=out-parity-llama --export=DIR         # a LLaMA trained here -> DIR, Hugging Face's layout
    python train.py ... --init_from=hf --hf_model=DIR            # continue pretraining it, with any --structure

DIR is a local directory in Hugging Face's layout: config.json (model_type llama) and model.safetensors, or shards
listed in model.safetensors.index.json; a hub id (HuggingFaceTB/SmolLM2-135M) is downloaded with huggingface_hub
when it is installed and online. Nothing in the directory is executed: weights come from safetensors only (a
pytorch_model.bin pickle is refused), config.json is read as JSON, and no remote code is run. What this model.py
does not compute (another architecture, biases, sliding windows, another RoPE scaling) is refused in one line.
The vocabulary is kept as it is both ways: a model loaded here has config.json's vocab_size, and to_hf writes the
model's own (train.py pads a vocabulary to a multiple of 64: the padded rows are written, never trained).
"""
import hashlib
import json
import os
import shutil
from dataclasses import asdict, fields

import numpy as np
import torch
from torch.nn import functional as F

from model import Level, SubLLM, SubLLMConfig

# the fields of SubLLMConfig that config.json gives; the others (structure, keep_ratio, the SUBLLM recipe, dropout)
# are the caller's
ARCHITECTURE = ('vocab_size', 'block_size', 'n_embd', 'n_head', 'n_kv_head', 'ffn_hidden', 'rope_theta',
                'rope_scaling', 'norm_eps', 'tie_embeddings')
LLAMA3_KEYS = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
# the new levels of a SUBLLM made from a LLaMA (init_levels): 'scratch' as a model trained from scratch has them
# (random scorers, bypass c 0.5), 'c1' (bypass c 1: a kept token takes the inner blocks' output at its full soft
# weight) and 'fitted' (c 1, and each scorer fitted to rank tokens by how much the level's blocks change them)
LEVEL_INITS = ('scratch', 'c1', 'fitted')


def hf_names(model):
    """[(our parameter name, Hugging Face's tensor name)] of a model's weights, its blocks numbered in order whatever
    levels hold them. A tied lm_head is the embedding (Hugging Face writes it once, as embed_tokens)."""
    ours = {id(p): name for name, p in model.named_parameters()}  # named_parameters lists a tied weight once
    pairs = [(ours[id(model.tok_embeddings.weight)], 'model.embed_tokens.weight'),
             (ours[id(model.norm.weight)], 'model.norm.weight')]
    if not model.config.tie_embeddings:
        pairs.append((ours[id(model.lm_head.weight)], 'lm_head.weight'))
    parts = [('attn_norm', 'input_layernorm'), ('mlp_norm', 'post_attention_layernorm'),
             ('attn.wq', 'self_attn.q_proj'), ('attn.wk', 'self_attn.k_proj'), ('attn.wv', 'self_attn.v_proj'),
             ('attn.wo', 'self_attn.o_proj'), ('mlp.gate', 'mlp.gate_proj'), ('mlp.up', 'mlp.up_proj'),
             ('mlp.down', 'mlp.down_proj')]
    for i, block in enumerate(model.blocks()):
        for mine, theirs in parts:
            pairs.append((ours[id(block.get_submodule(mine).weight)], f'model.layers.{i}.{theirs}.weight'))
    return pairs

# -----------------------------------------------------------------------------
# reading


def resolve(path):
    """A local directory, or a hub id ('org/name') downloaded by huggingface_hub (json and safetensors files only)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise SystemExit(f"{path} is a file: give the model's directory (config.json and model.safetensors)")
    if path.count('/') != 1 or path.startswith(('.', '/', '~')):
        raise SystemExit(f"no directory {path}: give a Hugging Face model directory (config.json and "
                         f"model.safetensors) or a hub id such as HuggingFaceTB/SmolLM2-135M")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit(f"no directory {path}; to download it from the Hugging Face hub: pip install huggingface_hub "
                         f"(or git clone https://huggingface.co/{path})") from None
    try:
        return snapshot_download(path, allow_patterns=['*.json', '*.safetensors'])
    except Exception as e:  # offline (LocalEntryNotFoundError, connection errors), no such repo, a gated model
        raise SystemExit(f"cannot download {path} from the Hugging Face hub ({type(e).__name__}; offline, or no such "
                         f"model?): download it where you are online (huggingface-cli download {path} --local-dir "
                         f"DIR) and give the directory") from None


def read_config(directory):
    """The SubLLMConfig fields that config.json gives, and its number of blocks; one line for what we do not run."""
    path = os.path.join(directory, 'config.json')
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"no config.json in {directory}: not a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path} cannot be read as JSON ({e})") from None
    kind = hf.get('model_type') if isinstance(hf, dict) else None
    if kind != 'llama':
        raise SystemExit(f"{directory} is a {kind or 'model of no model_type'} model (config.json): only the LLaMA "
                         f"architecture (model_type llama) loads here")
    rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}  # transformers 5 writes rope_parameters
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    lacks = [k for k in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
             if not isinstance(hf.get(k), int)]
    if lacks:
        raise SystemExit(f"{path} has no {lacks[0]} (a whole number): not a LLaMA's config")
    n_embd, n_head = hf['hidden_size'], hf['num_attention_heads']
    for bad, why in [
            (hf.get('hidden_act', 'silu') != 'silu', f"hidden_act {hf.get('hidden_act')!r} (SwiGLU here is silu)"),
            (hf.get('attention_bias') or hf.get('mlp_bias'), "biases in attention or MLP (attention_bias, mlp_bias)"),
            (hf.get('sliding_window') is not None, "sliding-window attention"),
            (rope_type not in ('default', 'llama3'), f"rope_type {rope_type!r} (only plain RoPE and 'llama3')"),
            (hf.get('head_dim', n_embd // n_head) * n_head != n_embd,
             f"head_dim {hf.get('head_dim')} * {n_head} heads != hidden_size {n_embd}")]:
        if bad:
            raise SystemExit(f"{path}: {why} is not supported by this model.py")
    scaling = None
    if rope_type == 'llama3':
        missing = [k for k in LLAMA3_KEYS if k not in rope]
        if missing:
            raise SystemExit(f"{path}: rope_type llama3 without {', '.join(missing)}")
        scaling = {k: rope[k] for k in LLAMA3_KEYS}
    theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))  # transformers' defaults, where a key is missing
    config = dict(vocab_size=hf['vocab_size'], block_size=hf.get('max_position_embeddings', 2048), n_embd=n_embd,
                  n_head=n_head, n_kv_head=hf.get('num_key_value_heads') or n_head, ffn_hidden=hf['intermediate_size'],
                  rope_theta=float(theta), rope_scaling=scaling, norm_eps=hf.get('rms_norm_eps', 1e-6),
                  tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
    return config, hf['num_hidden_layers']


def read_tensors(directory, names):
    """{name: tensor} for these names, from model.safetensors or the shards of model.safetensors.index.json."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise SystemExit("reading Hugging Face models needs safetensors: pip install safetensors") from None
    index = os.path.join(directory, 'model.safetensors.index.json')
    if os.path.exists(index):
        try:
            with open(index) as f:
                where = json.load(f)['weight_map']  # tensor name -> shard file
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{index} cannot be read ({type(e).__name__}: {e})") from None
    elif os.path.exists(os.path.join(directory, 'model.safetensors')):
        where = None
    elif os.path.exists(os.path.join(directory, 'pytorch_model.bin')):
        raise SystemExit(f"{directory} has pytorch_model.bin, a pickle, which can run code when loaded: this loader "
                         f"reads safetensors only (download the model's model.safetensors, or convert it yourself)")
    else:
        raise SystemExit(f"no model.safetensors (nor model.safetensors.index.json) in {directory}")
    files = {}  # file -> its tensor names
    for name in names:
        file = 'model.safetensors' if where is None else where.get(name, 'model.safetensors.index.json')
        files.setdefault(file, []).append(name)
    tensors = {}
    for file, wanted in files.items():
        path = os.path.join(directory, file)
        try:
            with safe_open(path, framework='pt') as f:
                have = set(f.keys())
                missing = [n for n in wanted if n not in have]
                if missing:
                    raise SystemExit(f"{path} has no {missing[0]}" + (f" (and {len(missing) - 1} more)" if
                                     len(missing) > 1 else '') + ": the weights do not match config.json")
                extra = sorted(n for n in have - set(names) if not n.endswith('rotary_emb.inv_freq'))
                if extra and where is None:  # biases, another architecture's tensors (shards: checked by the index)
                    raise SystemExit(f"{path} has {extra[0]}, which a LLaMA of config.json does not have")
                tensors.update({n: f.get_tensor(n) for n in wanted})
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a missing shard, a damaged file
            why = 'no such file' if not os.path.exists(path) else ' '.join(str(e).split())[:200]
            raise SystemExit(f"cannot read {path} ({why})") from None
    if where is not None:
        extra = sorted(n for n in where if n not in set(names) and not n.endswith('rotary_emb.inv_freq'))
        if extra:
            raise SystemExit(f"{index} lists {extra[0]}, which a LLaMA of config.json does not have")
    return tensors


@torch.no_grad()
def from_hf(path, structure=None, **overrides):
    """The SubLLM of a Hugging Face LLaMA directory (or hub id), in fp32: its blocks in order, in `structure` (None:
    the LLaMA itself, 'T' per block; levels around some blocks make a SUBLLM, its new scorers and bypasses as
    SubLLM.__init__ makes them for training from scratch). overrides: the other SubLLMConfig fields (keep_ratio,
    the SUBLLM recipe, dropout, block_size to shorten the RoPE table). One line for anything that does not fit."""
    directory = resolve(path)
    config, n_layer = read_config(directory)
    structure = structure or 'T' * n_layer
    fixed = [k for k in overrides if k in ARCHITECTURE and k != 'block_size']
    if fixed:
        raise SystemExit(f"{', '.join(fixed)} come(s) from {directory}/config.json, not from the caller")
    try:
        if set(structure) - set('T()') or structure.count('T') != n_layer:
            raise ValueError(f"structure {structure!r} must place the model's {n_layer} blocks: {n_layer} T's and "
                             f"levels, e.g. {'T' * n_layer!r}")
        model = SubLLM(SubLLMConfig(**{**config, **overrides, 'structure': structure}))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"cannot build {directory} here: {e}") from None
    pairs = hf_names(model)
    tensors = read_tensors(directory, [theirs for _, theirs in pairs])
    params = dict(model.named_parameters())
    for mine, theirs in pairs:
        if tensors[theirs].shape != params[mine].shape:
            raise SystemExit(f"{directory}: {theirs} has shape {tuple(tensors[theirs].shape)}, config.json makes it "
                             f"{tuple(params[mine].shape)}")
        params[mine].copy_(tensors[theirs])  # in fp32 (a bf16 file is widened exactly)
    return model

# -----------------------------------------------------------------------------
# writing


def to_hf(model, path):
    """Write a model without levels (a LLaMA: the baseline structure, or any model trained here without levels) as
    a Hugging Face directory: config.json and model.safetensors (fp32, or the model's dtype), each written to a temp
    file and renamed. transformers.LlamaForCausalLM.from_pretrained(path) computes the same logits."""
    c = model.config
    if model.levels() or 'R' in c.structure:
        raise SystemExit(f"to_hf writes a LLaMA, and structure {c.structure} has subsampled levels or recurrent "
                         f"blocks, which LlamaForCausalLM does not have")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise SystemExit("writing Hugging Face models needs safetensors: pip install safetensors") from None
    dtype = model.lm_head.weight.dtype
    config = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': c.vocab_size,
              'hidden_size': c.n_embd, 'intermediate_size': c.ffn_hidden, 'num_hidden_layers': len(model.blocks()),
              'num_attention_heads': c.n_head, 'num_key_value_heads': c.n_kv_head, 'head_dim': c.n_embd // c.n_head,
              'hidden_act': 'silu', 'max_position_embeddings': c.block_size, 'rms_norm_eps': c.norm_eps,
              'rope_theta': c.rope_theta, 'tie_word_embeddings': c.tie_embeddings, 'attention_bias': False,
              'mlp_bias': False, 'torch_dtype': str(dtype).removeprefix('torch.')}
    if c.rope_scaling is not None:  # the layout transformers 4 reads, and 5 converts
        config['rope_scaling'] = {'rope_type': 'llama3', **c.rope_scaling}
    params = dict(model.named_parameters())
    tensors = {theirs: params[mine].detach().cpu().contiguous() for mine, theirs in hf_names(model)}
    os.makedirs(path, exist_ok=True)
    try:
        save_file(tensors, os.path.join(path, 'model.safetensors.tmp'), metadata={'format': 'pt'})
        os.replace(os.path.join(path, 'model.safetensors.tmp'), os.path.join(path, 'model.safetensors'))
        with open(os.path.join(path, 'config.json.tmp'), 'w') as f:
            json.dump(config, f, indent=2)
        os.replace(os.path.join(path, 'config.json.tmp'), os.path.join(path, 'config.json'))
    except OSError as e:
        raise SystemExit(f"cannot write {path}/ ({e.strerror or e})") from None
    return path

# -----------------------------------------------------------------------------
# a SUBLLM made from a LLaMA: the new levels' initialisation, and train.py --init_from=hf


def llama_updates(model, batches):
    """Per level: its input tokens x (N, C) and how much its inner blocks change each one, log(|update| / |x|) (N,),
    with every token through every block: the LLaMA that the model was made from, whatever its scorers say."""
    recorded = {level: [] for level in model.levels()}

    def run(stack, x, pos, rope):  # Stack.forward without selection
        cos, sin = rope[0][pos], rope[1][pos]
        for layer in stack.layers:
            if isinstance(layer, Level):
                y = run(layer.inner, x, pos, rope)
                recorded[layer].append((x.flatten(0, 1), ((y - x).norm(dim=-1) / x.norm(dim=-1)).log().flatten()))
                x = y
            else:
                x = layer(x, cos, sin)
        return x
    for idx in batches:
        pos = torch.arange(idx.size(1))[None]
        run(model.stack, model.tok_embeddings(idx), pos, (model.rope_cos, model.rope_sin))
    return {level: tuple(torch.cat(parts) for parts in zip(*pairs)) for level, pairs in recorded.items()}


@torch.no_grad()
def init_levels(model, how, batches):
    """Initialise the new levels of a SUBLLM made from a LLaMA (LEVEL_INITS), then set each level's running cut on
    `batches` (token ids (B, T), training text) as train.py does at the end of a run, so that eval mode keeps
    keep_ratio from the first eval. 'fitted': each scorer is a least-squares fit, on rms_norm(x) as the scorer reads
    it, of how much the level's blocks change each token (llama_updates), scaled to unit variance as the random
    init: the tokens that the blocks work on most are kept."""
    if how not in LEVEL_INITS:
        raise ValueError(f"the new levels' initialisation must be one of {', '.join(LEVEL_INITS)}, got {how!r}")
    for level in model.levels():
        level.bypass.c.fill_(0.5 if how == 'scratch' else 1.0)
    if how == 'fitted':
        was_training = model.training
        model.eval()  # no dropout
        for level, (x, change) in llama_updates(model, batches).items():
            features = (F.rms_norm(x, (x.size(-1),)) if model.config.scorer_norm else x).double()
            target = (change - change.mean()).double()[:, None]
            weight = torch.linalg.lstsq(features, target).solution  # (C, 1)
            level.scorer.weight.copy_((weight / (features @ weight).std().clamp(min=1e-9)).T)  # unit-variance scores
        model.train(was_training)
    model.calibrate_cuts(batches)


def training_crops(data_path, block_size, n, seed):
    """n crops (1, block_size) of token ids from the first train file of a dataset that prepare.py wrote."""
    from dataset import open_dataset
    meta, files, first_crop = open_dataset(data_path, block_size)
    data = np.memmap(os.path.join(data_path, files['train'][0]), dtype=meta['dtype'], mode='r')
    starts = torch.randint(len(data) - block_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [torch.from_numpy(data[s:s + block_size].astype(np.int64))[None] for s in starts]


def tokenizer_check(directory, meta, data_path):
    """One line when the model has its own tokenizer (DIR/tokenizer.json) and the data was tokenized with another."""
    path = os.path.join(directory, 'tokenizer.json')
    if os.path.exists(path):
        with open(path, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if meta.get('tokenizer_sha256') != digest:
            raise SystemExit(f"{data_path} was tokenized with {meta['tokenizer']}, not with {directory}'s own "
                             f"tokenizer: python prepare.py --tokenizer=hf:{directory} (with your --input or "
                             f"--dataset) and train on that")


def from_hf_run(config, meta, data_path, say=print):
    """train.py --init_from=hf: a new run at iter 0 from config['hf_model'] (a directory or hub id), in the run's
    structure and SUBLLM recipe (config: train.py's settings), its dims from config.json; levels initialised by
    config['hf_init'] on crops of the run's training data. One line for anything that does not fit."""
    if not config['hf_model']:
        raise SystemExit("--init_from=hf needs --hf_model=DIR: a Hugging Face LLaMA directory or hub id")
    if config['hf_init'] not in LEVEL_INITS:
        raise SystemExit(f"--hf_init must be one of {', '.join(LEVEL_INITS)}, got {config['hf_init']!r}")
    directory = resolve(config['hf_model'])
    tokenizer_check(directory, meta, data_path)
    recipe = {f.name: config[f.name] for f in fields(SubLLMConfig) if f.name not in ARCHITECTURE and f.name in config}
    model = from_hf(directory, **recipe)
    if meta['vocab_size'] > model.config.vocab_size:
        has_json = os.path.exists(os.path.join(directory, 'tokenizer.json'))
        raise SystemExit(f"the data's vocab ({meta['vocab_size']}, {meta['tokenizer']}) is larger than the model's "
                         f"({model.config.vocab_size}): prepare the data with " + (
                             f"--tokenizer=hf:{directory}" if has_json else
                             f"the tokenizer the model was trained on ({directory} has no tokenizer.json)"))
    c = model.config
    say(f"from {directory}: {len(model.blocks())} blocks, n_embd {c.n_embd}, n_head {c.n_head}, n_kv_head "
        f"{c.n_kv_head}, ffn_hidden {c.ffn_hidden}, vocab {c.vocab_size}, block_size {c.block_size} (config.json's; "
        f"this run's dims settings are not used)")
    if model.levels():
        crops = training_crops(data_path, min(config['block_size'], c.block_size), config['eval_iters'] * 4,
                               config['seed'] + 3_000_017)
        init_levels(model, config['hf_init'], [torch.cat(crops[i:i + 4]) for i in range(0, len(crops), 4)])
        say(f"new levels: {config['hf_init']} (bypass c {model.levels()[0].bypass.c[0].item():g}), running cuts "
            f"set on {len(crops)} train crops: " + ', '.join(f"d{lv.depth} {lv.score_offset.item():+.3f}"
                                                             for lv in model.levels()))
    return model

# -----------------------------------------------------------------------------
# python hf.py: a Hugging Face directory to a checkpoint that sample.py, eval.py and bench.py read, or back


def convert(
        hf_model='',   # a Hugging Face LLaMA directory or hub id, to write as out_dir/ckpt.pt
        out_dir='',    # the checkpoint's out_dir: written from hf_model, or read for --export
        export='',     # write out_dir's trained LLaMA to this directory, in Hugging Face's layout
        tokenizer='',  # with --hf_model, the tokens of a directory without tokenizer.json: byte or gpt2
):
    """python hf.py: one direction or the other; one line for a mistake."""
    from run_dir import load_checkpoint, model_from
    from tokenizer import get_tokenizer
    if bool(hf_model) == bool(export) or not out_dir:
        raise SystemExit("give --hf_model=DIR --out_dir=OUT (DIR to a checkpoint), or --out_dir=OUT --export=DIR "
                         "(a trained LLaMA to DIR)")
    if export:
        checkpoint, path = load_checkpoint(out_dir)
        to_hf(model_from(checkpoint, path), export)
        source = checkpoint.get('meta', {}).get('tokenizer') or ''
        for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):  # the model's own
            if source.startswith('hf:') and os.path.exists(os.path.join(source[3:], name)):
                shutil.copyfile(os.path.join(source[3:], name), os.path.join(export, name))
        print(f"wrote {export}/ from {path} (iter {checkpoint.get('iter_num')})"
              + (f", with the tokenizer of {source[3:]}" if source.startswith('hf:') else ''))
        return
    directory = resolve(hf_model)
    has_json = os.path.exists(os.path.join(directory, 'tokenizer.json'))
    if has_json == bool(tokenizer):
        raise SystemExit(f"{directory} has its own tokenizer.json: drop --tokenizer" if has_json else
                         f"{directory} has no tokenizer.json: give --tokenizer=byte or gpt2, the tokens it was "
                         f"trained on")
    tok = get_tokenizer(tokenizer or f'hf:{directory}')
    model = from_hf(directory)
    path = os.path.join(out_dir, 'ckpt.pt')
    if os.path.exists(path):
        raise SystemExit(f"{path} exists: give another --out_dir")
    os.makedirs(out_dir, exist_ok=True)
    meta = {'tokenizer': tok.name, 'vocab_size': tok.vocab_size, 'eot_token': tok.eot_token, **tok.meta}
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config), 'meta': meta, 'iter_num': 0,
                'config': {'hf_model': hf_model}}, path + '.tmp')
    os.replace(path + '.tmp', path)
    print(f"wrote {path}: {directory}, {model.get_num_params() / 1e6:.2f}M parameters, {len(model.blocks())} blocks, "
          f"{tok.name} tokens (python sample.py --out_dir={out_dir})")


if __name__ == '__main__':
    from configurator import configure, function_namespace
    namespace = function_namespace(convert)
    given = configure(namespace)
    convert(**{k: namespace[k] for k in given})
