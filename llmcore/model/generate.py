"""Autoregressive generation with a KV cache (llmcore.ops.flash_attn_with_kvcache).

    stream(model, prompt_ids, ...)            -> iterator of token ids (int), as they are sampled
    stream_text(model, tokenizer, prompt_ids) -> iterator of text pieces (whole UTF-8 characters)
    generate(model, prompts, ...)             -> list of generated id lists (one per prompt)

Sampling, per step, on the last position's logits (fp32): repetition penalty (HF rule: a seen
token's logit is divided by p if positive, multiplied by p otherwise), temperature (0 = greedy),
top-k, top-p (nucleus: the smallest set whose probability reaches top_p; the most likely token is
always kept, so top_p = 0 is greedy), then a multinomial draw. Temperatures below 1e-5 are greedy
(vLLM's rule): logits / T would overflow to inf and the softmax to NaN.
Generation stops at max_new_tokens, at a stop token (not yielded), or when the cache is full.
A prompt is prefilled in one forward; each new token is one decode forward of length 1.
"""
import torch

from llmcore.model.model import KVCache


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


def sample_next(logits, seen=None, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """logits (B, V) -> next ids (B,). seen (B, T) ids already in the context, for the penalty."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        prev = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep tokens until the mass before them reaches top_p
        drop[:, 0] = False  # ... and always the most likely one (top_p = 0 would drop every token)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def _cache_dtype(model, device):
    dev = torch.device(device).type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return next(model.parameters()).dtype


@torch.no_grad()
def stream_batch(model, prompt_ids, max_new_tokens=256, temperature=0.8, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, stop_tokens=(), generator=None):
    """prompt_ids (B, S) LongTensor of equal-length prompts. Yields (ids (B,), alive (B,) bool) per
    step; a row that produced a stop token is no longer alive (its later ids are meaningless)."""
    was_training = model.training
    model.eval()
    try:
        B, S = prompt_ids.shape
        device = prompt_ids.device
        max_len = S + max_new_tokens
        cache = KVCache(model.cfg, B, max_len, device=device, dtype=_cache_dtype(model, device))
        stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
        seen = prompt_ids
        alive = torch.ones(B, dtype=torch.bool, device=device)
        logits = model(prompt_ids, cache=cache)[:, -1]
        cache.advance(S)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)
            if stop.numel():
                alive = alive & ~torch.isin(nxt, stop)
            if not bool(alive.any()):
                return
            yield nxt, alive.clone()
            seen = torch.cat((seen, nxt[:, None]), 1)
            if int(cache.seqlens.max()) >= max_len:
                return
            logits = model(nxt[:, None], cache=cache)[:, -1]
            cache.advance(1)
    finally:
        model.train(was_training)


def stream(model, prompt_ids, max_new_tokens=256, **kw):
    """One prompt (list of ids or 1-D tensor) -> iterator of generated token ids (int)."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).view(1, -1)
    for nxt, alive in stream_batch(model, ids, max_new_tokens, **kw):
        if not alive[0]:
            return
        yield int(nxt[0])


def stream_text(model, tokenizer, prompt_ids, max_new_tokens=256, **kw):
    """Like stream() but yields decoded text pieces; a piece is held back while it ends in an
    incomplete UTF-8 sequence (byte-level BPE can split a character across tokens)."""
    ids, sent = [], ""
    for t in stream(model, prompt_ids, max_new_tokens, **kw):
        ids.append(t)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(sent):
            yield text[len(sent):]
            sent = text


def generate(model, prompts, max_new_tokens=256, **kw):
    """prompts: a list of id lists (any lengths) or a (B, S) tensor -> list of generated id lists
    (stop tokens excluded). Equal-length prompts run as one batch; otherwise one at a time."""
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if len({len(p) for p in prompts}) == 1:
        batches = [list(range(len(prompts)))]
    else:
        batches = [[i] for i in range(len(prompts))]
    out = [None] * len(prompts)
    for rows in batches:
        ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        got = [[] for _ in rows]
        done = [False] * len(rows)
        for nxt, alive in stream_batch(model, ids, max_new_tokens, **kw):
            for j in range(len(rows)):
                if not done[j] and bool(alive[j]):
                    got[j].append(int(nxt[j]))
                else:
                    done[j] = True
        for j, i in enumerate(rows):
            out[i] = got[j]
    return out
