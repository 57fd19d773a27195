// The gateway's HTTP API (/v1), with the optional API key (sessionStorage) sent as a bearer token.
// A 401 asks the page for a key (one prompt shared by all requests waiting on it) and retries.

const KEY_STORAGE = "lv.apiKey";
const MAX_KEY_TRIES = 5;

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

let promptForKey = null; // (reason, refused) -> Promise<string | null>
let pendingPrompt = null;

export function onKeyNeeded(fn) {
  promptForKey = fn;
}

export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lives only as long as the request */
  }
  document.dispatchEvent(new CustomEvent("lv:apikey"));
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function askForKey(reason, refused) {
  if (!promptForKey) return null;
  if (!pendingPrompt) {
    pendingPrompt = promptForKey(reason, refused).finally(() => {
      pendingPrompt = null;
    });
  }
  return pendingPrompt;
}

/** The reason the server gave ({"detail": "..."}), or a description of the status. */
async function reasonOf(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  } catch {
    /* not JSON */
  }
  return `${response.status} ${response.statusText || "error"}${text ? `: ${text.slice(0, 200)}` : ""}`;
}

/** fetch() with the key; throws ApiError(status, reason) on a non-2xx answer or a network failure. */
export async function request(path, { method = "GET", body = undefined, signal = undefined } = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const sentKey = apiKey();
    let response;
    try {
      response = await fetch(path, { method, body, signal, headers: authHeaders() });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `cannot reach the server (${e.message})`);
    }
    if (response.status === 401 && attempt < MAX_KEY_TRIES) {
      const reason = await reasonOf(response);
      // Another request may have stored a new key meanwhile: retry with it before asking.
      if (apiKey() && apiKey() !== sentKey) continue;
      const key = await askForKey(reason, Boolean(sentKey));
      if (!key) throw new ApiError(401, reason);
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await reasonOf(response));
    return response;
  }
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

export async function getBlob(path, options) {
  return (await request(path, options)).blob();
}

/**
 * POST /v1/jobs as multipart (`files` + `options` JSON), with upload progress.
 * onProgress(sentBytes, totalBytes). Resolves to the 202 body {id, status, links}.
 */
export async function submitJob(files, options, onProgress) {
  for (let attempt = 0; ; attempt += 1) {
    const sentKey = apiKey();
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    form.append("options", JSON.stringify(options));
    const { status, text } = await new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/v1/jobs");
      for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
      xhr.upload.addEventListener("progress", (e) => {
        if (e.lengthComputable && onProgress) onProgress(e.loaded, e.total);
      });
      xhr.addEventListener("load", () => resolve({ status: xhr.status, text: xhr.responseText }));
      xhr.addEventListener("error", () => reject(new ApiError(0, "cannot reach the server (upload failed)")));
      xhr.addEventListener("abort", () => reject(new ApiError(0, "upload aborted")));
      xhr.send(form);
    });
    const response = new Response(text, { status: status || 599 });
    if (status === 401 && attempt < MAX_KEY_TRIES) {
      const reason = await reasonOf(response);
      if (apiKey() && apiKey() !== sentKey) continue;
      const key = await askForKey(reason, Boolean(sentKey));
      if (!key) throw new ApiError(401, reason);
      continue;
    }
    if (status < 200 || status >= 300) throw new ApiError(status, await reasonOf(response));
    return JSON.parse(text);
  }
}

export const api = {
  options: () => getJSON("/v1/options"),
  jobs: (limit = 200) => getJSON(`/v1/jobs?limit=${limit}`),
  job: (id, signal) => getJSON(`/v1/jobs/${id}`, { signal }),
  cancel: (id) => getJSON(`/v1/jobs/${id}/cancel`, { method: "POST" }),
  remove: (id) => getJSON(`/v1/jobs/${id}`, { method: "DELETE" }),
  async results(id) {
    const text = await (await request(`/v1/jobs/${id}/results`)).text();
    return text
      .split("\n")
      .filter((line) => line.trim())
      .map((line) => JSON.parse(line));
  },
  summary: (id) => getJSON(`/v1/jobs/${id}/summary`),
  /** One caption's word -> patch maps (a job run with `attributions`); region: its index, or null. */
  attributionMap(id, image, layer, region = null) {
    const query = new URLSearchParams({ image, layer: String(layer) });
    if (region !== null) query.set("region", String(region));
    return getJSON(`/v1/jobs/${id}/attributions/map?${query}`);
  },
};
