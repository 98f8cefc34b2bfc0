// The page behind `peftmm serve`: pick an adapter, give an image (and a question where the adapter
// reads one), show what it answers: an answer with its scores, a caption, or a similarity. An
// instruct adapter gets a conversation instead (the part below): turns sent through the
// OpenAI-compatible /v1/chat/completions with stream: true, the answer shown as it is written.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("ask"), select = $("adapter"), fileInput = $("image"), drop = $("drop");
const preview = $("preview"), question = $("question"), button = $("submit");
let image = null;      // the File to send
let adapters = {};     // name -> description from /api/adapters

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function describe(info) {
  const methods = Object.entries(info.methods)
    .map(([tower, list]) => `${tower}: ${list.length ? list.join(", ") : "frozen"}`).join("; ");
  const answers = info.labels ? `, ${info.labels} answers` : "";  // a captioner has no answer list
  return `${info.task}${answers} · ${methods} · ${info.fusion} fusion · ` +
    `${info.trainable_params.toLocaleString()} trained parameters`;
}

// Whether the chosen adapter reads a question ("required"); a captioning adapter refuses one and
// a classifier with a fixed prompt ignores it, so the field is hidden for those.
function wantsQuestion() {
  const info = adapters[select.value];
  return !info || info.question === undefined || info.question === "required";
}

// The button's words: a captioner describes the image, any other adapter is asked.
function verb(busy) {
  const captioning = (adapters[select.value] || {}).question === "refused";
  return captioning ? (busy ? "Describing…" : "Describe") : (busy ? "Asking…" : "Ask");
}

async function loadAdapters() {
  try {
    const data = await api("/api/adapters");
    adapters = Object.fromEntries(data.adapters.map((a) => [a.name, a]));
    const previous = select.value;
    select.replaceChildren();
    if (!data.adapters.length) {
      select.append(new Option("No adapters loaded", ""));
    }
    for (const info of data.adapters) select.append(new Option(info.name, info.name));
    if (previous in adapters) select.value = previous;
    showAdapterInfo();
    $("status").textContent = `${data.adapters.length} adapter(s) on ${data.backbones.length} backbone(s)`;
  } catch (error) {
    $("status").textContent = "Server unreachable";
    showError(`Could not list the adapters: ${error.message}`);
  }
}

// Whether the chosen adapter converses (task instruct): it gets the chat view, not the form.
function converses() {
  return (adapters[select.value] || {}).task === "instruct";
}

function showAdapterInfo() {
  const info = adapters[select.value];
  $("adapter-info").textContent = info ? describe(info) : "";
  $("question-field").hidden = !wantsQuestion();
  button.textContent = verb(false);
  const chatting = converses();
  form.hidden = chatting;
  $("result").hidden = $("result").hidden || chatting;
  $("chat").hidden = !chatting;
  if (chatting && chatAdapter !== select.value) newConversation();   // a conversation is with one adapter
}

function useFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image.`);
    return;
  }
  showError("");
  image = file;
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = `Chosen image: ${file.name}`;
  preview.hidden = false;
  drop.classList.add("has-image");
}

// The main line of a result, whatever the task decodes: an answer, a caption, or (retrieval)
// the remaining fields as "key: value".
function headline(result) {
  if (result.answer !== undefined) return ["Answer", result.answer];
  if (result.caption !== undefined) return ["Caption", result.caption];
  const rest = Object.entries(result).filter(([key]) => !["adapter", "question", "scores"].includes(key));
  return ["Result", rest.map(([key, value]) => `${key}: ${value}`).join(", ")];
}

function showResult(result) {
  const [title, text] = headline(result);
  $("result-title").textContent = title;
  $("answer").textContent = text;
  const list = $("scores");
  list.replaceChildren();
  for (const item of result.scores || []) {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = item.answer;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, item.score)) * 100}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = item.score.toFixed(3);
    row.append(name, bar, value);
    list.append(row);
  }
  $("result").hidden = false;
}

async function ask(event) {
  event.preventDefault();
  showError("");
  if (!select.value) return showError("Choose an adapter.");
  if (!image) return showError("Choose an image.");
  const asking = wantsQuestion();
  if (asking && !question.value.trim()) { question.focus(); return showError("Type a question."); }
  const body = new FormData();
  body.append("adapter", select.value);
  if (asking) body.append("question", question.value);
  body.append("image", image, image.name || "image");
  button.disabled = true;
  button.textContent = verb(true);
  try {
    showResult(await api("/api/predict", { method: "POST", body }));
  } catch (error) {
    $("result").hidden = true;
    showError(error.message);
  } finally {
    button.disabled = false;
    button.textContent = verb(false);
  }
}

// -- the conversation (instruct adapters) ------------------------------------------------------
const chatForm = $("chat-form"), chatText = $("chat-text"), chatSend = $("chat-send");
const chatPreview = $("chat-preview"), chatFile = $("chat-image");
let conversation = [];   // the OpenAI messages so far (user turns with their images as data: URLs)
let chatImage = null;    // the File attached to the next user turn
let chatAdapter = null;  // the adapter the conversation is with

function newConversation() {
  conversation = [];
  chatAdapter = select.value;
  $("turns").replaceChildren();
  attach(null);
  showError("");
}

function attach(file) {
  if (file && file.type && !file.type.startsWith("image/")) return showError(`${file.name} is not an image.`);
  chatImage = file || null;
  if (chatPreview.src) URL.revokeObjectURL(chatPreview.src);
  chatPreview.hidden = !chatImage;
  chatPreview.src = chatImage ? URL.createObjectURL(chatImage) : "";
  chatPreview.alt = chatImage ? `Attached: ${chatImage.name}` : "";
  chatFile.value = "";
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function addTurn(role, text, imageUrl) {
  const turn = document.createElement("li");
  turn.className = `turn ${role}`;
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "Image sent with this message";
    turn.append(img);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  turn.append(body);
  $("turns").append(turn);
  return turn;
}

// Reads the server-sent events of a streamed completion, calling onText with each new piece; an
// error event (sent after the headers, so with status 200) becomes an exception.
async function readStream(response, onText) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      for (const line of lines) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const piece = chunk.choices && chunk.choices.length ? chunk.choices[0].delta.content : "";
        if (piece) onText(piece);
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  showError("");
  const text = chatText.value.trim();
  if (!text) { chatText.focus(); return showError("Type a message."); }
  if (!chatImage && !conversation.length) return showError("Attach an image to the first message.");
  const image = chatImage ? await dataUrl(chatImage) : null;
  const content = (image ? [{ type: "image_url", image_url: { url: image } }] : []).concat([{ type: "text", text }]);
  const asked = { role: "user", content };
  const turns = [addTurn("user", text, image)];
  const reply = addTurn("assistant", "");
  turns.push(reply);
  reply.classList.add("streaming");
  reply.dataset.chunks = "0";
  chatSend.disabled = true;
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: chatAdapter, messages: conversation.concat([asked]), stream: true }),
    });
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (e) { /* not JSON */ }
      throw new Error((body && body.error && body.error.message) || `${response.status} ${response.statusText}`);
    }
    await readStream(response, (piece) => {
      answer += piece;
      reply.querySelector(".text").textContent = answer;
      reply.dataset.chunks = String(Number(reply.dataset.chunks) + 1);
    });
    reply.classList.remove("streaming");
    if (answer) {
      conversation.push(asked, { role: "assistant", content: answer });
    } else {   // the server refuses an empty assistant turn in a later request: this exchange is not kept
      reply.querySelector(".text").textContent = "(no answer)";
    }
    reply.dataset.done = "true";
    chatText.value = "";
    attach(null);
  } catch (error) {
    for (const turn of turns) turn.remove();   // nothing of a failed turn stays: it can be sent again
    showError(error.message);
  } finally {
    chatSend.disabled = false;
  }
}

chatForm.addEventListener("submit", sendChat);
chatFile.addEventListener("change", () => attach(chatFile.files[0]));
$("chat-new").addEventListener("click", newConversation);
select.addEventListener("change", showAdapterInfo);
fileInput.addEventListener("change", () => useFile(fileInput.files[0]));
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  useFile(event.dataTransfer.files[0]);
});
form.addEventListener("submit", ask);
loadAdapters();
