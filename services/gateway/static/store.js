// Recent jobs of this browser (localStorage), newest first, so a researcher can come back to them.

const STORAGE = "lv.recentJobs";
const MAX_JOBS = 50;

function read() {
  try {
    const list = JSON.parse(localStorage.getItem(STORAGE) || "[]");
    return Array.isArray(list) ? list.filter((j) => j && typeof j.id === "string") : [];
  } catch {
    return [];
  }
}

function write(list) {
  try {
    localStorage.setItem(STORAGE, JSON.stringify(list.slice(0, MAX_JOBS)));
  } catch {
    /* storage full or disabled: the list is a convenience */
  }
  document.dispatchEvent(new CustomEvent("lv:recent"));
}

export const recent = {
  list: read,
  get: (id) => read().find((j) => j.id === id),
  /** entry: {id, label, images, createdAt, status} */
  add(entry) {
    write([entry, ...read().filter((j) => j.id !== entry.id)]);
  },
  update(id, patch) {
    const list = read();
    const job = list.find((j) => j.id === id);
    if (!job) return;
    const changed = Object.entries(patch).some(([k, v]) => job[k] !== v);
    if (!changed) return;
    Object.assign(job, patch);
    write(list);
  },
  remove(id) {
    write(read().filter((j) => j.id !== id));
  },
};
