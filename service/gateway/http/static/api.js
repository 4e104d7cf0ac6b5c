// The gateway's HTTP/JSON API, as the page uses it: same origin, nothing else.

/** A failed call: the gRPC code name and message of the server's JSON error. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(token, json) {
  const out = {};
  if (token) out.Authorization = `Bearer ${token}`;
  if (json) out["Content-Type"] = "application/json";
  return out;
}

async function failure(response) {
  try {
    const { error } = await response.json();
    return new ApiError(response.status, error.code, error.message);
  } catch {
    return new ApiError(response.status, "UNKNOWN", `HTTP ${response.status}`);
  }
}

/** GET a JSON resource. */
export async function getJson(path, token) {
  const response = await fetch(path, { headers: headers(token, false) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/**
 * POST an explain request with ?stream=true and call onEvent(name, data) for each
 * server-sent event as it arrives. Aborting `signal` closes the connection, which
 * cancels the work on the server.
 */
export async function explainStream(model, body, { token, signal, onEvent }) {
  const response = await fetch(`/v1/models/${encodeURIComponent(model)}:explain?stream=true`, {
    method: "POST",
    headers: headers(token, true),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

/** The base64 of a file's bytes. */
export function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
