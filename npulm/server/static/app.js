// The chat page: streams /v1/chat/completions (SSE) into the log, Stop aborts the request (the server cancels the
// generation when the connection closes), tokens/s live while streaming.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

// absolute URLs on the page's origin: a page opened as http://user:key@host/ would otherwise give fetch relative
// URLs holding the credentials, which it refuses; the browser sends its Basic credentials on its own
function api(path) {
  return new URL(path, location.origin).href;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("apikey").value || localStorage.getItem("npulm-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "assistant") body.appendChild(renderMarkdown(text)); else body.textContent = text;
  div.append(label, body);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return body;
}

async function loadModel() {
  try {
    const r = await fetch(api("/v1/models"), {headers: headers()});
    const data = await r.json();
    $("model").textContent = r.ok ? data.data[0].id : "(" + data.error.message + ")";
  } catch (e) {
    $("model").textContent = "(server unreachable)";
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  history.push({role: "user", content: text});
  addMessage("user", text);
  const body = addMessage("assistant", "");
  const messages = ($("system").value ? [{role: "system", content: $("system").value}] : []).concat(history);
  const request = {model: $("model").textContent, messages, stream: true,
                   temperature: parseFloat($("temperature").value || "0.7")};
  if ($("max_tokens").value) request.max_tokens = parseInt($("max_tokens").value, 10);
  controller = new AbortController();
  setBusy(true);
  let reply = "", n = 0, t0 = 0;
  const show = () => {
    body.replaceChildren(renderMarkdown(reply));
    const dt = (performance.now() - t0) / 1000;
    $("stats").textContent = n + " tokens" + (n > 1 && dt > 0 ? ", " + ((n - 1) / dt).toFixed(1) + " tokens/s" : "");
    $("log").scrollTop = $("log").scrollHeight;
  };
  try {
    const r = await fetch(api("/v1/chat/completions"), {method: "POST", headers: headers(), body: JSON.stringify(request),
                                                   signal: controller.signal});
    if (!r.ok) {
      const err = await r.json().catch(() => ({error: {message: r.statusText}}));
      throw new Error(err.error.message || r.statusText);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
        if (delta) {
          if (!t0) t0 = performance.now();
          reply += delta;
          n++;
          show();
        }
        if (chunk.timings && chunk.timings.predicted_n) {
          n = chunk.timings.predicted_n;
          $("stats").textContent = n + " tokens, " + chunk.timings.predicted_per_second.toFixed(1) + " tokens/s";
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      $("stats").textContent += " (stopped)";
    } else {
      body.parentElement.classList.add("error");
      body.textContent = "Error: " + e.message;
    }
  } finally {
    history.push({role: "assistant", content: reply});
    controller = null;
    setBusy(false);
    body.parentElement.dataset.done = "1";
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); $("stats").textContent = ""; });
$("apikey").addEventListener("change", () => { localStorage.setItem("npulm-key", $("apikey").value); loadModel(); });
loadModel();
