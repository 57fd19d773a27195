// Thumbnails of images inside a .tar shard the user picked: an index of its members (read header by
// header with File.slice, never the whole file), then one member as a Blob when a page shows it.

const BLOCK = 512;
const indexes = new WeakMap(); // File -> Promise<Map<name, {offset, size}>>

function text(bytes, start, length) {
  const slice = bytes.subarray(start, start + length);
  const end = slice.indexOf(0);
  return new TextDecoder().decode(end === -1 ? slice : slice.subarray(0, end));
}

function octal(bytes, start, length) {
  const raw = text(bytes, start, length).trim();
  return raw ? parseInt(raw, 8) : 0;
}

function paxPath(bytes) {
  // Records "<len> key=value\n".
  const body = new TextDecoder().decode(bytes);
  for (const record of body.split("\n")) {
    const m = /^\d+ path=(.*)$/.exec(record);
    if (m) return m[1];
  }
  return null;
}

async function buildIndex(file) {
  const members = new Map();
  let offset = 0;
  let longName = null;
  while (offset + BLOCK <= file.size) {
    const header = new Uint8Array(await file.slice(offset, offset + BLOCK).arrayBuffer());
    if (header.every((b) => b === 0)) break;
    const size = octal(header, 124, 12);
    const type = String.fromCharCode(header[156] || 48);
    const dataStart = offset + BLOCK;
    const next = dataStart + Math.ceil(size / BLOCK) * BLOCK;
    if (type === "L" || type === "x") {
      const data = new Uint8Array(await file.slice(dataStart, dataStart + size).arrayBuffer());
      longName = type === "L" ? text(data, 0, size) : paxPath(data) || longName;
    } else {
      const prefix = text(header, 345, 155);
      const name = longName || (prefix ? `${prefix}/${text(header, 0, 100)}` : text(header, 0, 100));
      longName = null;
      if (type === "0" || type === "\0" || type === "7") members.set(name, { offset: dataStart, size });
    }
    offset = next;
  }
  return members;
}

/** The Blob of member `name` (case-insensitive extension) in the tar File, or null. */
export async function tarMember(file, name, type = "") {
  if (!indexes.has(file)) indexes.set(file, buildIndex(file).catch(() => new Map()));
  const members = await indexes.get(file);
  let entry = members.get(name);
  if (!entry) {
    const lower = name.toLowerCase();
    for (const [member, value] of members) {
      if (member.toLowerCase() === lower) {
        entry = value;
        break;
      }
    }
  }
  return entry ? file.slice(entry.offset, entry.offset + entry.size, type) : null;
}
