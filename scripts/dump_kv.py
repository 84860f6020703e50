#!/usr/bin/env python3
"""Record a Hugging Face causal LM's post-RoPE q, k, v (and attention output) per layer as a kvslim trace.

A kvslim trace (lib/trace/trace.ts) is a safetensors file with, per layer i,
  layers.{i}.q    F32 [n, qHeads, headDim]   queries, post-RoPE
  layers.{i}.k    F32 [n, kvHeads, headDim]  keys, post-RoPE
  layers.{i}.v    F32 [n, kvHeads, headDim]
  layers.{i}.out  F32 [n, qHeads, headDim]   optional: the attention output (input of o_proj)
and a `__metadata__` of JSON strings: `format` = 'kvslim-trace/1', `config` (layers, qHeads,
kvHeads, headDim plus model facts), `tokens` (the n token ids), and extra fields: `promptTokens`,
`prompt`, `turns` (one {text, start, end} per follow-up turn; rows start..end-1).

The writer (`encode_trace`, `write_trace`) needs only numpy; torch and transformers are imported
only when a model is captured, so `--help` and the writer work without them.

Capture: the prompt and every follow-up turn are tokenized (the prompt with the tokenizer's
special tokens, turns without) and concatenated, then run through the model in ONE forward pass
(causal attention makes every row's q, k, v the same as in a turn-by-turn prefill). The script
replaces the `apply_rotary_pos_emb` function of the attention module's modeling file (Llama,
Mistral, Qwen2/Qwen3, Gemma and the other architectures whose attention calls that function with
[batch, heads, seq, headDim] q and k) and records what it returns; v is the output of `v_proj`
and `out` the input of `o_proj`. Architectures without those (fused qkv projections such as
GPT-NeoX, Phi-3, Falcon; no RoPE; ALiBi) are rejected with a message. Limits: sliding-window and
other masking only affects `out`, never q/k/v; the stored k is what a server's cache holds before
any cache-side quantization; batch size is 1.
"""
import argparse
import json
import os
import struct
import sys

try:
    import numpy as np
except ImportError:  # reported by the functions that need it
    np = None

TRACE_FORMAT = 'kvslim-trace/1'
SHAPE_FIELDS = ('layers', 'qHeads', 'kvHeads', 'headDim')
PARTS = ('q', 'k', 'v', 'out')


def _need_numpy():
    if np is None:
        raise RuntimeError('dump_kv.py needs numpy (pip install numpy)')


def _check_config(config):
    if not isinstance(config, dict):
        raise ValueError(f'expected a dict for meta["config"], got {type(config).__name__}')
    for field in SHAPE_FIELDS:
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
            raise ValueError(f'expected a positive integer (<= 65536) for config["{field}"], got {value!r}')
    if config['qHeads'] % config['kvHeads'] != 0:
        raise ValueError(f'config["qHeads"] ({config["qHeads"]}) must be a multiple of config["kvHeads"] ({config["kvHeads"]})')


def _check_tokens(tokens):
    if not isinstance(tokens, (list, tuple)):
        raise ValueError(f'expected a list of token ids for meta["tokens"], got {type(tokens).__name__}')
    out = []
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0 or token > 2**53 - 1:
            raise ValueError(f'expected non-negative integer token ids, got {token!r}')
        out.append(int(token))
    return out


def _tensors(layers, config, rows):
    """(name, contiguous little-endian float32 array) per tensor, checked against the config."""
    if len(layers) != config['layers']:
        raise ValueError(f'expected {config["layers"]} layers (config["layers"]), got {len(layers)}')
    heads = {'q': config['qHeads'], 'k': config['kvHeads'], 'v': config['kvHeads'], 'out': config['qHeads']}
    tensors = []
    for i, layer in enumerate(layers):
        unknown = set(layer) - set(PARTS)
        if unknown:
            raise ValueError(f'layer {i} has unknown parts {sorted(unknown)} (expected q, k, v and optionally out)')
        for part in PARTS:
            if layer.get(part) is None:
                if part == 'out':
                    continue
                raise ValueError(f'layer {i} has no {part}')
            array = np.asarray(layer[part])
            expected = (rows, heads[part], config['headDim'])
            if array.shape != expected:
                raise ValueError(f'layers.{i}.{part} has shape {list(array.shape)}, expected {list(expected)}')
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f'layers.{i}.{part} has dtype {array.dtype}, expected a float type')
            tensors.append((f'layers.{i}.{part}', np.ascontiguousarray(array, dtype='<f4')))
    return tensors


def _header(tensors, meta):
    metadata = {'format': TRACE_FORMAT}
    for field, value in meta.items():
        if field == 'format':
            raise ValueError(f'meta["format"] is reserved (it is always {TRACE_FORMAT!r})')
        if not isinstance(field, str):
            raise ValueError(f'meta keys must be strings, got {field!r}')
        # allow_nan=False: NaN/Infinity are not JSON and kvslim's reader would reject them.
        metadata[field] = json.dumps(value, allow_nan=False, separators=(',', ':'))
    header = {'__metadata__': metadata}
    offset = 0
    for name, array in tensors:  # all F32: any order keeps every tensor 4-byte aligned
        header[name] = {'dtype': 'F32', 'shape': list(array.shape), 'data_offsets': [offset, offset + array.nbytes]}
        offset += array.nbytes
    data = json.dumps(header, separators=(',', ':')).encode('utf-8')
    data += b' ' * (-len(data) % 8)  # pad to 8 bytes with spaces, as safetensors does
    return struct.pack('<Q', len(data)) + data


def _prepare(layers, meta):
    _need_numpy()
    if not isinstance(meta, dict):
        raise ValueError(f'expected a dict for meta, got {type(meta).__name__}')
    config = meta.get('config')
    _check_config(config)
    tokens = _check_tokens(meta.get('tokens'))
    tensors = _tensors(list(layers), config, len(tokens))
    return tensors, _header(tensors, {**meta, 'tokens': tokens})


def encode_trace(layers, meta):
    """Bytes of a kvslim trace. `layers[i]` is a dict of q [n, qHeads, headDim], k and v
    [n, kvHeads, headDim] and optional out (like q), any float arrays (stored as float32);
    `meta` holds `config` (layers, qHeads, kvHeads, headDim, extra JSON fields), `tokens` (n ids)
    and any extra JSON-serialisable fields. Raises ValueError naming the inconsistent part."""
    tensors, header = _prepare(layers, meta)
    return header + b''.join(array.tobytes() for _, array in tensors)


def write_trace(path, layers, meta):
    """Writes `encode_trace(layers, meta)` to `path`, one tensor at a time."""
    tensors, header = _prepare(layers, meta)
    with open(path, 'wb') as file:
        file.write(header)
        for _, array in tensors:
            file.write(array.tobytes())


# ---- capture (torch + transformers, imported lazily) ----------------------------------------

class UnsupportedModel(RuntimeError):
    pass


class _Stop(Exception):
    """Raised after the last recorded layer when --max-layers cuts the forward pass short."""


def _decoder_layers(model):
    for path in ('model.layers', 'model.model.layers', 'model.language_model.layers', 'transformer.h'):
        node = model
        for name in path.split('.'):
            node = getattr(node, name, None)
            if node is None:
                break
        if node is not None:
            return list(node)
    raise UnsupportedModel(
        f'unsupported architecture {type(model).__name__}: no model.layers of Llama-style decoder layers '
        '(supported: Llama, Mistral, Qwen2/3, Gemma and others with self_attn.q_proj/k_proj/v_proj/o_proj and apply_rotary_pos_emb)')


def _rope_theta(config):
    theta = getattr(config, 'rope_theta', None)
    if theta is None:
        params = getattr(config, 'rope_parameters', None) or {}
        theta = params.get('rope_theta') if isinstance(params, dict) else None
    return float(theta) if theta is not None else None


def capture(model_id, prompt, turns=(), dtype='float32', device=None, max_layers=None, with_out=True, trust_remote_code=False, log=print):
    """Runs the model on prompt + turns; returns (layers, meta) for write_trace."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise RuntimeError(f'capturing needs torch and transformers ({error}); pip install torch transformers') from error

    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    torch_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    # transformers 4.56 renamed torch_dtype to dtype (the old name warns in 5.x).
    version = tuple(int(part) for part in transformers.__version__.split('.')[:2] if part.isdigit())
    dtype_argument = {'dtype' if version >= (4, 56) else 'torch_dtype': torch_dtype}
    model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=trust_remote_code, **dtype_argument)
    model.to(device).eval()
    hf = model.config
    if getattr(hf, 'is_encoder_decoder', False):
        raise UnsupportedModel(f'{hf.model_type}: encoder-decoder models are not supported')

    # Token rows: the prompt with special tokens (BOS), each turn appended without.
    tokens = list(tokenizer(prompt, add_special_tokens=True)['input_ids'])
    prompt_tokens = len(tokens)
    turn_meta = []
    for text in turns:
        ids = list(tokenizer(text, add_special_tokens=False)['input_ids'])
        if not ids:
            raise ValueError(f'turn {text!r} tokenizes to no tokens')
        turn_meta.append({'text': text, 'start': len(tokens), 'end': len(tokens) + len(ids)})
        tokens += ids
    rows = len(tokens)

    decoder = _decoder_layers(model)
    count = len(decoder) if max_layers is None else min(max_layers, len(decoder))
    attentions = []
    for i, layer in enumerate(decoder[:count]):
        attn = getattr(layer, 'self_attn', None)
        missing = [name for name in ('v_proj', 'o_proj') if attn is None or not isinstance(getattr(attn, name, None), torch.nn.Module)]
        if missing:
            raise UnsupportedModel(
                f'{hf.model_type}: layer {i} has no self_attn.{"/".join(missing)} (fused qkv projections such as GPT-NeoX, Phi-3 '
                'or Falcon are not supported; Llama, Mistral, Qwen2/3 and Gemma-style attention are)')
        attentions.append(attn)
    modules = {sys.modules[type(attn).__module__] for attn in attentions}
    for module in modules:
        if not callable(getattr(module, 'apply_rotary_pos_emb', None)):
            raise UnsupportedModel(f'{hf.model_type}: {module.__name__} has no apply_rotary_pos_emb (no RoPE, or applied another way)')

    store = [dict() for _ in range(count)]
    state = {'layer': None}

    def to_rows(tensor, unsqueeze_dim):  # -> numpy float32 [rows, heads, headDim]
        tensor = tensor.detach()
        if tensor.dim() != 4 or tensor.shape[0] != 1:
            raise UnsupportedModel(f'{hf.model_type}: expected [1, ., ., headDim] tensors from apply_rotary_pos_emb, got {list(tensor.shape)}')
        # [1, heads, seq, headDim] (the usual layout, unsqueeze_dim=1) or [1, seq, heads, headDim]
        seq_first = tensor.shape[1] == rows and (tensor.shape[2] != rows or unsqueeze_dim == 2)
        tensor = tensor[0] if seq_first else tensor[0].transpose(0, 1)
        if tensor.shape[0] != rows:
            raise UnsupportedModel(f'{hf.model_type}: apply_rotary_pos_emb saw {tensor.shape[0]} rows, expected {rows}')
        return tensor.float().cpu().numpy()

    def record(i, part, value):
        if part in store[i]:
            raise UnsupportedModel(f'{hf.model_type}: layer {i} produced {part} twice in one forward pass')
        store[i][part] = value

    originals = {module: module.apply_rotary_pos_emb for module in modules}

    def wrap(original):
        def apply_rotary_pos_emb(q, k, *args, **kwargs):
            q_embed, k_embed = original(q, k, *args, **kwargs)
            if state['layer'] is not None:
                unsqueeze_dim = kwargs.get('unsqueeze_dim', 1)
                record(state['layer'], 'q', to_rows(q_embed, unsqueeze_dim))
                record(state['layer'], 'k', to_rows(k_embed, unsqueeze_dim))
            return q_embed, k_embed
        return apply_rotary_pos_emb

    handles = []

    def attn_pre(i):
        def hook(module, args, kwargs=None):
            state['layer'] = i
        return hook

    def v_hook(i, heads, head_dim):
        def hook(module, args, output):
            record(i, 'v', output.detach()[0].reshape(rows, -1, head_dim).float().cpu().numpy())
        return hook

    def o_pre(i, heads, head_dim, last):
        def hook(module, args):
            if with_out:
                record(i, 'out', args[0].detach()[0].reshape(rows, -1, head_dim).float().cpu().numpy())
            state['layer'] = None
            if last:
                raise _Stop()
        return hook

    try:
        for module in modules:
            module.apply_rotary_pos_emb = wrap(originals[module])
        q_heads = hf.num_attention_heads
        kv_heads = getattr(hf, 'num_key_value_heads', None) or q_heads
        head_dim = getattr(hf, 'head_dim', None) or hf.hidden_size // q_heads
        for i, attn in enumerate(attentions):
            handles.append(attn.register_forward_pre_hook(attn_pre(i)))
            handles.append(attn.v_proj.register_forward_hook(v_hook(i, kv_heads, head_dim)))
            handles.append(attn.o_proj.register_forward_pre_hook(o_pre(i, q_heads, head_dim, max_layers is not None and i == count - 1)))
        log(f'running {model_id} on {rows} tokens ({prompt_tokens} prompt + {rows - prompt_tokens} in {len(turns)} turn(s)) on {device}, {dtype}')
        with torch.no_grad():
            try:
                model(input_ids=torch.tensor([tokens], device=device), use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for module, original in originals.items():
            module.apply_rotary_pos_emb = original

    layers = []
    for i, parts in enumerate(store):
        for part in ('q', 'k', 'v') + (('out',) if with_out else ()):
            if part not in parts:
                raise UnsupportedModel(
                    f'{hf.model_type}: layer {i} never produced {part} (its attention does not call '
                    f'apply_rotary_pos_emb, v_proj and o_proj the Llama way)')
        layers.append(parts)
    q_heads, head_dim = layers[0]['q'].shape[1:]
    kv_heads = layers[0]['k'].shape[1]
    config = {
        'layers': count, 'qHeads': int(q_heads), 'kvHeads': int(kv_heads), 'headDim': int(head_dim),
        'modelLayers': len(decoder), 'ropeTheta': _rope_theta(hf), 'rope': {'theta': _rope_theta(hf), 'style': 'half'},
        'ropeScaling': getattr(hf, 'rope_scaling', None), 'architecture': hf.model_type, 'dim': getattr(hf, 'hidden_size', None),
        'vocabSize': getattr(hf, 'vocab_size', None), 'keys': 'post-rope', 'model': model_id, 'dtype': dtype,
        'transformers': transformers.__version__,
    }
    meta = {'config': config, 'tokens': tokens, 'promptTokens': prompt_tokens, 'prompt': prompt, 'turns': turn_meta}
    return layers, json.loads(json.dumps(meta, default=str))  # rope_scaling etc. as plain JSON


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='dump_kv.py',
        description='Record a Hugging Face causal LM\'s post-RoPE q, k, v (and attention output) per layer for a prompt and '
                    'follow-up turns, as a kvslim trace (safetensors) for readTrace / kvslim eval.',
        epilog='Supported: attention modules with v_proj/o_proj whose modeling file applies RoPE through '
               'apply_rotary_pos_emb (Llama, Mistral, Qwen2/3, Gemma, ...). Needs torch and transformers to capture.')
    parser.add_argument('--model', required=True, help='Hugging Face model id or local path')
    parser.add_argument('--prompt', required=True, help='the shared context (tokenized with special tokens, e.g. BOS)')
    parser.add_argument('--turn', action='append', default=[], help='a follow-up turn appended as raw text (repeatable)')
    parser.add_argument('--out', required=True, help='output trace file (.safetensors)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default='float32', help='model compute dtype (the trace is always float32)')
    parser.add_argument('--device', choices=('cuda', 'cpu'), help='default: cuda when available, else cpu')
    parser.add_argument('--max-layers', type=_positive, help='record only the first N layers (the forward pass stops there)')
    parser.add_argument('--no-out', action='store_true', help='do not record the attention output (layers.{i}.out)')
    parser.add_argument('--trust-remote-code', action='store_true', help='pass trust_remote_code=True to transformers')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        print(f'dump_kv.py: error: the folder of --out does not exist: {out_dir}', file=sys.stderr)
        return 2
    try:
        _need_numpy()
        layers, meta = capture(args.model, args.prompt, args.turn, dtype=args.dtype, device=args.device,
                               max_layers=args.max_layers, with_out=not args.no_out, trust_remote_code=args.trust_remote_code,
                               log=lambda line: print(line, file=sys.stderr))
        write_trace(args.out, layers, meta)
    except (RuntimeError, ValueError, OSError) as error:
        print(f'dump_kv.py: error: {error}', file=sys.stderr)
        return 1
    config = meta['config']
    print(f'wrote {args.out}: {config["layers"]} layers x {len(meta["tokens"])} tokens ({meta["promptTokens"]} prompt + '
          f'{len(meta["tokens"]) - meta["promptTokens"]} in {len(meta["turns"])} turn(s)), qHeads {config["qHeads"]}, '
          f'kvHeads {config["kvHeads"]}, headDim {config["headDim"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
