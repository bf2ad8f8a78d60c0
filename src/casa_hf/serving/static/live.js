// Live captioning: sample frames of a video file (or the webcam) at a chosen rate, post each to a CASA session,
// show the caption as it streams and chart time to first token and cache size per frame. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("video"), grab = $("grab"), captions = $("captions"), chart = $("chart");
let session = null, running = false, points = [];

fetch("/v1/models").then((r) => r.json()).then((m) => { $("model").textContent = m.data[0].id; });

function setStatus(text) { $("status").textContent = text; }

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  video.srcObject = null;
  video.src = URL.createObjectURL(file);
  $("start").disabled = false;
});

$("webcam").addEventListener("click", async () => {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setStatus("this browser gives no webcam here (it needs https or localhost)");
    return;
  }
  try {
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
    $("start").disabled = false;
  } catch (error) {
    setStatus("webcam refused: " + error.message);
  }
});

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: body ? { "Content-Type": "application/json" } : {}, body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) {
    const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
    throw new Error(`${response.status}: ${error.error.message}`);
  }
  return response;
}

function frameDataUrl() {
  const side = Math.min(video.videoWidth, video.videoHeight, 448);
  const scale = side / Math.min(video.videoWidth, video.videoHeight);
  grab.width = Math.round(video.videoWidth * scale);
  grab.height = Math.round(video.videoHeight * scale);
  grab.getContext("2d").drawImage(video, 0, 0, grab.width, grab.height);
  return grab.toDataURL("image/jpeg", 0.9);
}

// Post one frame; append streamed tokens to a caption line; resolve with the final "done" event.
async function sendFrame(image) {
  const line = document.createElement("div");
  line.className = "live";
  line.textContent = `[${video.currentTime.toFixed(1)}s] `;
  captions.appendChild(line);
  const response = await api("POST", `/v1/sessions/${session.id}/frames`, { image });
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", done = null;
  for (;;) {
    const { value, done: finished } = await reader.read();
    if (finished) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (data === "[DONE]") continue;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      if (event.type === "token") line.textContent += event.text;
      if (event.type === "done") done = event;
    }
    captions.scrollTop = captions.scrollHeight;
  }
  line.className = "caption";
  line.dataset.frame = done.frame;
  return done;
}

function drawChart() {
  const ctx = chart.getContext("2d"), w = chart.width, h = chart.height, pad = 34;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  ctx.strokeStyle = "#999";
  ctx.strokeRect(pad, 8, w - 2 * pad, h - pad - 8);
  if (!points.length) return;
  const series = [
    { key: "time_to_first_token_ms", color: "#d33", label: "TTFT ms", side: 0 },
    { key: "cache_kib", color: "#36c", label: "cache KiB", side: 1 },
  ];
  const n = Math.max(points.length, 2);
  for (const s of series) {
    const top = Math.max(...points.map((p) => p[s.key])) * 1.15 || 1;
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.beginPath();
    points.forEach((p, i) => {
      const x = pad + (i / (n - 1)) * (w - 2 * pad), y = h - pad - (p[s.key] / top) * (h - pad - 8);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
    ctx.textAlign = s.side ? "left" : "right";
    ctx.fillText(top.toFixed(0), s.side ? w - pad + 3 : pad - 3, 16);
    ctx.fillText("0", s.side ? w - pad + 3 : pad - 3, h - pad);
    ctx.textAlign = s.side ? "right" : "left";
    ctx.fillText(s.label, s.side ? w - pad : pad, h - 8);
  }
  ctx.fillStyle = "#555";
  ctx.textAlign = "center";
  ctx.fillText(`frame (${points.length})`, w / 2, h - 8);
}

async function loop() {
  const interval = 1000 / Number($("fps").value);
  while (running && !video.ended) {
    const started = performance.now();
    if (video.readyState >= 2) {
      const done = await sendFrame(frameDataUrl());
      points.push({ ...done, cache_kib: done.cache_bytes / 1024 });
      $("stats").textContent =
        `frame ${done.frame}: TTFT ${done.time_to_first_token_ms.toFixed(1)} ms, ` +
        `${done.cache_tokens} cache tokens, ${(done.cache_bytes / 1024).toFixed(1)} KiB`;
      drawChart();
    }
    await new Promise((r) => setTimeout(r, Math.max(0, interval - (performance.now() - started))));
  }
  stop();
}

$("start").addEventListener("click", async () => {
  try {
    captions.textContent = "";
    points = [];
    drawChart();
    const body = {
      prompt: $("prompt").value, max_tokens: Number($("max-tokens").value), window_tokens: Number($("window").value),
    };
    if ($("system").value) body.system = $("system").value;
    session = await (await api("POST", "/v1/sessions", body)).json();
    setStatus("");
    running = true;
    $("start").disabled = true;
    $("stop").disabled = false;
    await video.play();
    await loop();
  } catch (error) {
    setStatus(error.message);
    stop();
  }
});

async function stop() {
  running = false;
  video.pause();
  $("start").disabled = !(video.src || video.srcObject);
  $("stop").disabled = true;
  if (session) {
    const id = session.id;
    session = null;
    await api("DELETE", `/v1/sessions/${id}`).catch(() => {});
  }
}

$("stop").addEventListener("click", stop);
drawChart();
