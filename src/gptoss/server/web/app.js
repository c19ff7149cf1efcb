// The chat page: conversations in localStorage, answers streamed from /v1/chat/completions.
"use strict";

const STORE = "gptoss.chats";
const SETTINGS = "gptoss.settings";
const $ = (id) => document.getElementById(id);

const state = {
  chats: JSON.parse(localStorage.getItem(STORE) || "[]"),
  current: null, // id of the open conversation
  model: null,
  controller: null, // AbortController of the answer being streamed
};

function save() {
  localStorage.setItem(STORE, JSON.stringify(state.chats));
}

function settings() {
  return {
    apiKey: $("api-key").value.trim(),
    effort: $("effort").value,
    temperature: Number($("temperature").value),
    system: $("system").value,
    tools: $("tools").value,
  };
}

function loadSettings() {
  const s = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  if (s.apiKey) $("api-key").value = s.apiKey;
  if (s.effort) $("effort").value = s.effort;
  if (s.temperature !== undefined) $("temperature").value = s.temperature;
  if (s.system) $("system").value = s.system;
  if (s.tools) $("tools").value = s.tools;
  $("temperature-value").textContent = Number($("temperature").value).toFixed(1);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = settings().apiKey;
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function findModel() {
  if (state.model) return state.model;
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  state.model = (await response.json()).data[0].id;
  $("model-name").textContent = state.model;
  return state.model;
}

// ------------------------------------------------------------------ rendering

// Inline `code` and **bold** in a run of text.
function inline(text) {
  return text.split(/(`[^`\n]+`|\*\*[^*\n]+\*\*)/).map((piece, i) => {
    if (i % 2 === 0) return document.createTextNode(piece);
    const node = document.createElement(piece.startsWith("`") ? "code" : "strong");
    node.textContent = piece.startsWith("`") ? piece.slice(1, -1) : piece.slice(2, -2);
    return node;
  });
}

// Text with ``` fenced code blocks; everything goes through textContent, never innerHTML.
function renderText(element, text) {
  element.replaceChildren();
  const parts = text.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/^[\w+-]*\n/, "");
      pre.append(code);
      element.append(pre);
    } else {
      // The blank lines around a code block are the block's margins.
      if (i > 0) part = part.replace(/^\n+/, "");
      if (i < parts.length - 1) part = part.replace(/\n+$/, "");
      if (!part) return;
      const span = document.createElement("span");
      span.append(...inline(part));
      element.append(span);
    }
  });
}

function messageView(message) {
  const view = document.createElement("article");
  view.className = `message ${message.role}`;
  if (message.role === "assistant") {
    const reasoning = document.createElement("details");
    reasoning.className = "reasoning";
    reasoning.innerHTML = "<summary>Reasoning</summary>";
    const body = document.createElement("div");
    body.className = "reasoning-text";
    reasoning.append(body);
    view.append(reasoning);
    const calls = document.createElement("div");
    calls.className = "tool-calls";
    view.append(calls);
  }
  const content = document.createElement("div");
  content.className = "content";
  view.append(content);
  const meta = document.createElement("div");
  meta.className = "meta";
  view.append(meta);
  updateView(view, message);
  return view;
}

function updateView(view, message) {
  if (message.role === "assistant") {
    const reasoning = view.querySelector(".reasoning");
    reasoning.hidden = !message.reasoning;
    view.querySelector(".reasoning-text").textContent = message.reasoning || "";
    const calls = view.querySelector(".tool-calls");
    calls.replaceChildren(
      ...(message.tool_calls || []).map((call) => {
        const pre = document.createElement("pre");
        pre.className = "tool-call";
        pre.textContent = `${call.function.name}(${call.function.arguments})`;
        return pre;
      }),
    );
  }
  renderText(view.querySelector(".content"), message.content || "");
  const meta = view.querySelector(".meta");
  meta.textContent = message.error || message.meta || "";
  meta.classList.toggle("error", Boolean(message.error));
}

function chat() {
  return state.chats.find((c) => c.id === state.current);
}

function renderChats() {
  $("chats").replaceChildren(
    ...state.chats.map((c) => {
      const item = document.createElement("button");
      item.type = "button";
      item.className = "chat-link" + (c.id === state.current ? " active" : "");
      item.textContent = c.title || "New chat";
      item.addEventListener("click", () => open(c.id));
      return item;
    }),
  );
}

function renderMessages() {
  const current = chat();
  const list = $("messages");
  list.replaceChildren();
  const messages = current ? current.messages : [];
  if (!messages.length) list.append(emptyView);
  for (const message of messages) list.append(messageView(message));
  list.scrollTop = list.scrollHeight;
}

function open(id) {
  if (state.controller) return; // finish or stop the answer first
  state.current = id;
  renderChats();
  renderMessages();
  $("prompt").focus();
}

function newChat() {
  if (state.controller) return;
  const empty = state.chats.find((c) => !c.messages.length);
  if (empty) return open(empty.id);
  const c = { id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()), title: "", messages: [] };
  state.chats.unshift(c);
  save();
  open(c.id);
}

// ------------------------------------------------------------------ streaming

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

// Server-sent events from a fetch body: yields each `data:` payload.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

function apply(answer, delta) {
  if (delta.reasoning_content) answer.reasoning = (answer.reasoning || "") + delta.reasoning_content;
  if (delta.content) answer.content = (answer.content || "") + delta.content;
  for (const call of delta.tool_calls || []) {
    answer.tool_calls = answer.tool_calls || [];
    const slot = (answer.tool_calls[call.index] ||= { id: call.id, function: { name: "", arguments: "" } });
    slot.function.name += call.function?.name || "";
    slot.function.arguments += call.function?.arguments || "";
  }
}

// Function definitions the model may call (shown in the answer; this page does not run them).
function parseTools(text) {
  if (!text.trim()) return null;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`the Tools field is not valid JSON (${error.message})`);
  }
}

async function send(text) {
  if (!chat()) newChat();
  const current = chat();
  current.messages.push({ role: "user", content: text });
  if (!current.title) current.title = text.slice(0, 48);
  const answer = { role: "assistant", content: "", reasoning: "" };
  current.messages.push(answer);
  save();
  renderChats();
  renderMessages();
  const view = $("messages").lastElementChild;
  view.querySelector(".reasoning").open = true;
  view.classList.add("streaming");

  const s = settings();
  localStorage.setItem(SETTINGS, JSON.stringify(s));
  const history = current.messages.slice(0, -1).map((m) => {
    const out = { role: m.role, content: m.content || "" };
    if (m.tool_calls) out.tool_calls = m.tool_calls;
    return out;
  });
  if (s.system) history.unshift({ role: "system", content: s.system });
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let tokens = 0;
  try {
    const tools = parseTools(s.tools);
    const model = await findModel();
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: state.controller.signal,
      body: JSON.stringify({
        model,
        messages: history,
        stream: true,
        stream_options: { include_usage: true },
        reasoning_effort: s.effort,
        temperature: s.temperature,
        ...(tools ? { tools } : {}),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) apply(answer, choice.delta || {});
      updateView(view, answer);
      $("messages").scrollTop = $("messages").scrollHeight;
    }
    const seconds = (performance.now() - started) / 1000;
    answer.meta = `${tokens} tokens · ${(tokens / seconds).toFixed(1)} tokens/s`;
  } catch (error) {
    if (error.name === "AbortError") answer.meta = "Stopped";
    else answer.error = `Error: ${error.message}`;
  } finally {
    state.controller = null;
    setBusy(false);
    view.classList.remove("streaming");
    view.querySelector(".reasoning").open = false;
    updateView(view, answer);
    save();
    $("prompt").focus();
  }
}

// ------------------------------------------------------------------ wiring

const emptyView = $("empty");

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller?.abort());
$("new-chat").addEventListener("click", newChat);
$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(1);
});
$("settings").addEventListener("change", () => {
  localStorage.setItem(SETTINGS, JSON.stringify(settings()));
  state.model = null; // a new key may open the model list
});

loadSettings();
state.current = state.chats[0]?.id ?? null;
renderChats();
renderMessages();
findModel().catch(() => {}); // shows the model's name once the key (if any) is right
