// Captions as words, and the token positions each word came from (for its word -> patch map).
//
// A caption is tokens; the attribution maps have one row per token, and the API gives each token's
// text as it appears in the caption. No token spans two words: CLIP's tokenizer splits text into
// words at whitespace before encoding and ends a word's last token with "</w>" (a trailing space);
// Llama's and BERT's pieces begin a word with a leading space. A word is therefore a run of tokens
// that whitespace does not cut, and the caption's i-th whitespace-separated word is the i-th run.
// (The runs are matched by position, not spelling: a character whose bytes span two tokens decodes
// as "�" token by token but whole in the caption.) A word's map is the mean of its tokens' maps,
// which sums to 1 as each of them does. When the runs and the caption's words differ in number, no
// word gets a map rather than a wrong one. shared/pmi.py's word_runs groups them the same way.

/** "a red  circle" -> ["a", "red", "circle"]: the words a caption is shown as. */
export function captionWords(caption) {
  return (caption || "").trim().split(/\s+/).filter(Boolean);
}

/** Token texts -> the token positions of each of `caption`'s words, or null when they do not match. */
export function wordPositions(tokens, caption) {
  const runs = [];
  tokens.forEach((token, i) => {
    if (!runs.length || /\s$/.test(tokens[i - 1]) || /^\s/.test(token)) runs.push([]);
    runs[runs.length - 1].push(i);
  });
  const words = runs.filter((run) => run.some((p) => tokens[p].trim()));
  return words.length === captionWords(caption).length ? words : null;
}

/** The mean of rows `positions` of `maps` (each a flat gh*gw array). */
export function meanMap(maps, positions) {
  const out = new Float32Array(maps[positions[0]].length);
  for (const p of positions) maps[p].forEach((v, k) => { out[k] += v / positions.length; });
  return out;
}
