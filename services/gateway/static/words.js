// Captions as words, and the token positions each word came from (for its word -> patch map).
//
// A caption is BPE tokens; the attribution maps have one row per token, and the API gives each
// token's text as the tokenizer decodes it alone. CLIP's tokenizer ends a word's last token with
// "</w>", decoded as a space, and it splits text into words at whitespace before encoding, so no
// token spans two words. A word is therefore the run of tokens up to one whose text ends with a
// space, and the caption's i-th whitespace-separated word is the i-th run. (The runs are matched
// by position, not spelling: a character whose bytes span two tokens decodes as "�" token by
// token but whole in the caption.) A word's map is the mean of its tokens' maps, which sums to 1
// as each of them does. When the runs and the caption's words differ in number, no word gets a
// map rather than a wrong one.

/** "a red  circle" -> ["a", "red", "circle"]: the words a caption is shown as. */
export function captionWords(caption) {
  return (caption || "").trim().split(/\s+/).filter(Boolean);
}

/** Token texts -> the token positions of each of `caption`'s words, or null when they do not match. */
export function wordPositions(tokens, caption) {
  const runs = [];
  let run = [];
  tokens.forEach((token, i) => {
    run.push(i);
    if (/\s$/.test(token) || i === tokens.length - 1) {
      if (run.some((p) => tokens[p].trim())) runs.push(run);
      run = [];
    }
  });
  return runs.length === captionWords(caption).length ? runs : null;
}

/** The mean of rows `positions` of `maps` (each a flat gh*gw array). */
export function meanMap(maps, positions) {
  const out = new Float32Array(maps[positions[0]].length);
  for (const p of positions) maps[p].forEach((v, k) => { out[k] += v / positions.length; });
  return out;
}
