"""Beam search over a family's stepper: K beams per caption, length-normalised scores.

Rows are laid out caption-major: row b*K + j is beam j of caption b. Each step scores every beam's
continuations (log-softmax after min-length and repetition penalty), keeps the 2K best per caption,
files those that end (one of the family's stop ids: CoCa's end token or pad id 0) as finished
hypotheses (score / length**length_penalty) and continues with the K best that do not. A caption is
done when it has K hypotheses and no running beam can still beat the worst of them; its rows then
leave the batch. At the last slot every beam ends: with the end token where the family forces it
(CoCa, as in greedy decoding), else with the K best continuations as they are (transformers' beam
search finalises its running beams so). Each beam's per-step entropies and log-probabilities of its
chosen tokens (raw logits' log-softmax, before the penalties) follow it. With `attention`, each beam's
per-step attention over the image positions follows it like its entropies, and the best hypothesis' is
returned.
"""

from __future__ import annotations

import torch

from latent_verbalizer.services.decoder.sampling import (
    block_end_token,
    entropy_bits,
    repetition_penalty,
    tempered_logprob,
)
from latent_verbalizer.services.families.base import Family
from latent_verbalizer.shared.schemas import DecodeParams


@torch.inference_mode()
def search(
    family: Family, image_tokens: torch.Tensor, mask: torch.Tensor | None, params: DecodeParams,
    attention: bool = False,
) -> tuple[list[list[int]], list[list[float]], list[list[float]], list[torch.Tensor] | None]:
    """image_tokens [B, N, D], mask [B, N] or None -> per caption the best hypothesis' tokens, per-step
    entropies, per-step log-probabilities of its tokens (end token included) and, with `attention`,
    per-step attention [steps, N]."""
    B, K, S, device = image_tokens.shape[0], params.num_beams, params.seq_len, image_tokens.device
    N = image_tokens.shape[1]
    stepper = family.stepper(image_tokens, mask, S, attention)
    stepper.keep(torch.arange(B, device=device).repeat_interleave(K))  # K beams per caption: [B*K] rows
    last_slot_ends = family.force_end_at_limit
    seqs = torch.full((B * K, S), family.pad_id, dtype=torch.long, device=device)
    seqs[:, 0] = family.start_id
    ents = torch.zeros(B * K, S - 1, device=device)
    lps = torch.zeros(B * K, S - 1, device=device)  # each beam's token's log-probability at PMI's temperature
    attended = torch.zeros(B * K, S - 1, N, device=device) if attention else None  # [b*K, S-1, N]
    step_attention = torch.zeros(B * K, N, device=device) if attention else None
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    captions = list(range(B))  # caption index of each live caption, in batch order
    finished: list[list[tuple[float, list[int], list[float], list[float], torch.Tensor | None]]] = [
        [] for _ in range(B)]
    for pos in range(S - 1):
        cur_len, b = pos + 1, len(captions)
        logits = stepper.step(seqs[:, pos], pos, step_attention)  # [b*K, V]
        raw = torch.log_softmax(logits, dim=-1)  # [b*K, V]
        ents[:, pos] = entropy_bits(raw)
        if attended is not None:
            attended[:, pos] = step_attention
        logp = block_end_token(raw.clone(), cur_len, params.min_seq_len, family.end_ids)
        logp = repetition_penalty(logp, seqs[:, :cur_len], params.repetition_penalty)
        last = cur_len + 1 == S
        if last and last_slot_ends:  # last slot: every beam must end with the end token
            forced = torch.full_like(logp, float("-inf"))
            forced[:, family.end_id] = logp[:, family.end_id]
            logp = forced
        V = logp.shape[-1]
        total = (scores.view(-1, 1) + logp).view(b, K * V)
        top_scores, top_ids = total.topk(2 * K, dim=-1)  # [b, 2K]
        src_beam, token = top_ids // V, top_ids % V
        next_rows, next_tokens, next_scores, done = [], [], [], []
        for i, cap in enumerate(captions):
            kept = 0
            for rank, (s, j, t) in enumerate(zip(top_scores[i].tolist(), src_beam[i].tolist(), token[i].tolist())):
                row = i * K + j
                if s == float("-inf"):
                    break
                stops = t in family.stop_ids
                if stops or last:  # at the last slot a running beam ends as it is
                    if rank < K or not stops and kept < K:
                        _add(finished[cap], K, s / cur_len ** params.length_penalty,
                             seqs[row, 1:cur_len].tolist() + ([] if t in family.end_ids else [t]),
                             ents[row, : pos + 1].tolist(), lps[row, :pos].tolist()
                             + tempered_logprob(logits[row : row + 1], torch.tensor([t], device=device)).tolist(),
                             None if attended is None else attended[row, : pos + 1].clone())
                        kept += not stops
                    continue
                if kept < K:
                    next_rows.append(row)
                    next_tokens.append(t)
                    next_scores.append(s)
                    kept += 1
            if last:  # every beam of this caption ended in its last slot: none runs on
                continue
            while kept < K:  # fewer live continuations than beams: pad with dead beams
                next_rows.append(i * K)
                next_tokens.append(family.pad_id)
                next_scores.append(float("-inf"))
                kept += 1
            best_running = max(next_scores[-K:])
            hyps = finished[cap]
            done.append(
                len(hyps) == K and best_running / (cur_len + 1) ** params.length_penalty <= hyps[-1][0]
                or best_running == float("-inf")
            )
        if all(done) or last:
            break
        rows = torch.tensor(next_rows, device=device)
        seqs, ents, lps = seqs[rows], ents[rows], lps[rows]
        attended = None if attended is None else attended[rows]
        seqs[:, cur_len] = torch.tensor(next_tokens, device=device)
        lps[:, pos] = tempered_logprob(logits[rows], seqs[:, cur_len])
        scores = torch.tensor(next_scores, device=device).view(b, K)
        stepper.keep(rows)
        if any(done):  # drop the rows of finished captions
            live = [i for i, d in enumerate(done) if not d]
            keep = torch.tensor([i * K + j for i in live for j in range(K)], device=device)
            seqs, ents, lps, scores = seqs[keep], ents[keep], lps[keep], scores[live]
            if attended is not None:
                attended, step_attention = attended[keep], step_attention[: len(keep)]
            stepper.keep(keep)
            captions = [captions[i] for i in live]
    best = [max(h, key=lambda x: x[0]) for h in finished]
    return ([h[1] for h in best], [h[2] for h in best], [h[3] for h in best],
            None if attended is None else [h[4] for h in best])


def _add(hyps: list, k: int, score: float, tokens: list[int], entropy: list[float], logprob: list[float],
         attention: torch.Tensor | None) -> None:
    """Keep the k best finished hypotheses, sorted best first."""
    hyps.append((score, tokens, entropy, logprob, attention))
    hyps.sort(key=lambda h: -h[0])
    del hyps[k:]
