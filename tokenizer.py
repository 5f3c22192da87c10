"""
The tokenizers of prepare.py's token files, which sample.py and eval code decode with: gpt2 (tiktoken, vocab 50257;
its vocabulary is downloaded once and cached, or read from GPT2_BPE_FILE), byte (vocab 256, exact round trip), auto
(gpt2 if it loads, else byte), and hf:DIR (a Hugging Face model's own tokenizer.json, for a model loaded with hf.py).
Each has encode(str) -> list[int], decode(list[int]) -> str, vocab_size, name, eot_token, eot_text (what ends a
document, for meta.json) and meta (what else meta.json records about it).
"""
import base64
import hashlib
import json
import os
from pathlib import Path

EOT_TEXT = '<|endoftext|>'
# GPT-2's BPE ranks in tiktoken's format: the sha256 that tiktoken checks for r50k_base.tiktoken, which is GPT-2's
# vocabulary (openai-whisper ships the same file as whisper/assets/gpt2.tiktoken)
GPT2_BPE_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's encoder.py


class PrepareError(SystemExit):
    """A user error of the data pipeline (tokenizer.py, documents.py, prepare.py). Being a SystemExit, it ends the
    program with its one-line message, no traceback."""


class ByteTokenizer:
    name, vocab_size, eot_token, eot_text, meta = 'byte', 256, 0, 'NUL byte', {}

    def encode(self, text):
        """The UTF-8 bytes of a str; the bytes themselves of bytes (prepare.py reads files so: any bytes, exactly)."""
        return list(text if isinstance(text, bytes) else text.encode('utf-8'))

    def decode(self, ids):
        # a model can sample byte sequences that are not valid UTF-8: show them as U+FFFD, don't crash
        return bytes(ids).decode('utf-8', errors='replace')


class GPT2Tokenizer:
    name, eot_text, meta = 'gpt2', EOT_TEXT, {}

    def __init__(self):
        import tiktoken
        if os.environ.get('GPT2_BPE_FILE'):
            self.enc = gpt2_from_file(os.environ['GPT2_BPE_FILE'])
        else:
            try:
                self.enc = tiktoken.get_encoding('gpt2')
            except Exception as e:  # offline: requests' ConnectionError; also HTTP errors, a corrupt cache
                raise PrepareError(f"gpt2 tokenizer unavailable: tiktoken could not download the GPT-2 vocabulary "
                                   f"({type(e).__name__}; offline?). Use --tokenizer=byte, set TIKTOKEN_CACHE_DIR to a "
                                   f"directory holding a cached copy, or GPT2_BPE_FILE to a gpt2.tiktoken file "
                                   f"(python prepare.py --help)") from None
        self.vocab_size, self.eot_token = self.enc.n_vocab, self.enc.eot_token  # 50257, 50256

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # ordinary: '<|endoftext|>' in user text is just text

    def decode(self, ids):
        return self.enc.decode(list(ids))  # tiktoken already decodes with errors='replace'


def gpt2_from_file(path):
    """GPT-2's encoding from a local copy of its BPE ranks, so that gpt2 works offline. The sha256 check makes sure
    that the file is GPT-2's: another vocabulary would silently give other token ids."""
    import tiktoken
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PrepareError(f"GPT2_BPE_FILE={path}: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() != GPT2_BPE_SHA256:
        raise PrepareError(f"GPT2_BPE_FILE={path} is not GPT-2's BPE file (its sha256 is not "
                           f"{GPT2_BPE_SHA256[:16]}...): use whisper/assets/gpt2.tiktoken of the openai-whisper sdist")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding('gpt2', pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TEXT: 50256})


class HFTokenizer:
    """A Hugging Face model's own tokenizer: DIR/tokenizer.json through the `tokenizers` package, named 'hf:DIR' (DIR
    made absolute). Like gpt2's encode_ordinary, text that spells a special token is encoded as text; documents end
    with the model's eos token (tokenizer_config.json's eos_token, or config.json's eos_token_id). meta.json records
    the file's sha256, which hf.py checks against the model's."""

    def __init__(self, directory):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise PrepareError("--tokenizer=hf:DIR needs the tokenizers package: pip install tokenizers") from None
        path = Path(directory).resolve() / 'tokenizer.json'
        try:
            data = path.read_bytes()
            self.tok = Tokenizer.from_str(data.decode('utf-8'))
        except Exception as e:  # OSError, UnicodeDecodeError, or the plain Exception of tokenizers on a bad file
            why = 'no such file' if not path.exists() else ' '.join(str(e).split())[:150]
            raise PrepareError(f"cannot read the tokenizer {path} ({why}): give hf:DIR of a Hugging Face model "
                               f"directory that has tokenizer.json") from None
        self.tok.encode_special_tokens = True  # '</s>' in the text is text, not the eos token
        self.name, self.meta = f'hf:{path.parent}', {'tokenizer_sha256': hashlib.sha256(data).hexdigest()}
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eot_text, self.eot_token = eos_of(path.parent, self.tok)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids  # no BOS: documents are separated by eot_token

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)


def eos_of(directory, tok):
    """(text, id) of the end-of-sequence token of a Hugging Face tokenizer: tokenizer_config.json's eos_token, else
    config.json's eos_token_id."""
    for name, key in (('tokenizer_config.json', 'eos_token'), ('config.json', 'eos_token_id')):
        try:
            value = json.loads((directory / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        value = value.get('content') if isinstance(value, dict) else value[0] if isinstance(value, list) else value
        if isinstance(value, str) and tok.token_to_id(value) is not None:
            return value, tok.token_to_id(value)
        if isinstance(value, int) and tok.id_to_token(value) is not None:
            return tok.id_to_token(value), value
    raise PrepareError(f"cannot tell the end-of-text token of {directory}'s tokenizer: neither tokenizer_config.json's "
                       f"eos_token nor config.json's eos_token_id names one of its tokens")


def get_tokenizer(name):
    """'gpt2', 'byte', 'auto' (gpt2 when its vocabulary loads, else byte), or 'hf:DIR' (DIR/tokenizer.json).
    sample.py imports this."""
    if isinstance(name, str) and name.startswith('hf:'):
        return HFTokenizer(name[3:])
    if name == 'byte':
        return ByteTokenizer()
    if name == 'gpt2':
        return GPT2Tokenizer()
    if name == 'auto':
        try:
            return GPT2Tokenizer()
        except PrepareError:
            if os.environ.get('GPT2_BPE_FILE'):  # the user asked for that file: a bad one is an error, not a fallback
                raise
            print("tokenizer: auto -> byte (the gpt2 vocabulary could not be downloaded; this is fine offline)")
            return ByteTokenizer()
    raise PrepareError(f"unknown tokenizer {name!r}: use --tokenizer=auto, gpt2 or byte, or hf:DIR (a Hugging "
                       f"Face model's tokenizer.json)")


def dtype_for(vocab_size):
    return 'uint16' if vocab_size <= 65536 else 'uint32'  # token ids run 0..vocab_size-1

