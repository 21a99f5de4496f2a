// voxarc admin page: draws itself from the JSON API (no external scripts, no CDN).
"use strict";

const PAGE_SIZE = 25;
const REFRESH_MS = 15000;
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { sort: "received", order: "desc", offset: 0, total: 0, open: new Set(),
                patient: null, role: "admin" };

// A token given once as ?token= is kept for the tab and sent as a Bearer header.
const token = (() => {
  const fromUrl = new URLSearchParams(location.search).get("token");
  if (fromUrl) sessionStorage.setItem("voxarc-token", fromUrl);
  return fromUrl || sessionStorage.getItem("voxarc-token") || "";
})();

// How a request shows the token: a fetch in a header; what the page only links to (an img, an
// a), which cannot send a header, in its URL.
const authHeaders = token ? { Authorization: "Bearer " + token } : {};
const withToken = (url) =>
  (token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url);

async function api(path) {
  const response = await fetch(path, { headers: authHeaders, cache: "no-store" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

// A write (admins only): POST ``body`` as JSON (which a cross-site form cannot send); returns
// the response and its decoded JSON answer.
async function postJson(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json", ...authHeaders },
    body: JSON.stringify(body) });
  return [response, await response.json()];
}

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : String(n)) + " " + units[i];
}

const count = (n) => Number(n).toLocaleString("en-US");
const ratio = (r) => (r ? r.toFixed(3) : "–");
const when = (t) => (t ? new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ") : "");
const byId = (id) => document.getElementById(id);

function setText(id, text) { byId(id).textContent = text; }

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderTotals(s) {
  setText("total-instances", count(s.instances));
  setText("total-pending", count(s.pending_instances) + " waiting for compaction" +
    (s.deferred_stacks ? ", " + count(s.deferred_stacks) + " stacks to adapt when idle" : ""));
  setText("total-studies", count(s.studies));
  setText("total-series", count(s.series) + " series");
  setText("total-original", bytes(s.original_bytes));
  setText("total-stored", bytes(s.stored_bytes));
  const saved = s.original_bytes ? (100 * s.saved_bytes / s.original_bytes).toFixed(1) : "0";
  setText("total-saved", bytes(s.saved_bytes) + " saved (" + saved + " %)");
  setText("total-ratio", ratio(s.ratio));
  setText("total-bpv", s.bits_per_voxel ? s.bits_per_voxel.toFixed(2) : "–");
  setText("total-bpv-original", s.original_bits_per_voxel
    ? "of " + s.original_bits_per_voxel.toFixed(0) + " as received (coded stacks)"
    : "no stack coded yet");
  renderIntegrity(s.integrity);
  renderRoom(s.room);
}

// Room left (free disk, or what max_storage_bytes leaves) and how long it lasts at the pace
// of the last days; the card turns red under 30 days.
function renderRoom(room) {
  if (!room) return;
  const left = room.days_left;
  byId("room-card").classList.toggle("alarm", left !== null && left < 30);
  setText("room", bytes(room.room_bytes));
  const pace = `${bytes(room.stored_per_day_bytes)} a day over the last ` +
    `${room.window_days} day${room.window_days === 1 ? "" : "s"}`;
  setText("room-detail", "free" + (room.bound === "max_storage_bytes" ? " (max_storage_bytes)" : "") +
    (left === null ? `; no growth over the last ${room.window_days} days`
      : `; about ${count(Math.floor(left))} days at ${pace}`));
}

// The integrity patrol's last round: every stored file read back against its SHA-256.
function renderIntegrity(integrity) {
  const last = integrity && integrity.last_round;
  const damaged = last ? last.damaged_instances : 0;
  byId("integrity-card").classList.toggle("alarm", damaged > 0);
  if (!last) {
    setText("integrity", "not checked yet");
    setText("integrity-detail", integrity && integrity.every_days
      ? "every stored file is read back every " + integrity.every_days + " days"
      : "the patrol is off (scrub_every_days = 0)");
    return;
  }
  setText("integrity", damaged ? count(damaged) + " damaged" : "no damage");
  setText("integrity-detail", count(last.files) + " files, " + bytes(last.bytes) +
    " read back " + when(last.finished) + (damaged ? "; run voxarc verify" : ""));
}

function svgEl(name, attrs, parent) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

// Grouped columns: received and stored bytes for each label, on one linear axis.
function barChart(svg, items, labelKey) {
  svg.replaceChildren();
  const width = svg.clientWidth || 600, height = svg.clientHeight || 240;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  if (!items.length) {
    svgEl("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, svg)
      .textContent = "nothing stored yet";
    return;
  }
  const left = 64, right = 10, top = 18, bottom = 34;
  const plotW = width - left - right, plotH = height - top - bottom;
  const max = Math.max(...items.map((d) => d.original_bytes), 1);
  for (let k = 0; k <= 4; k++) {
    const y = top + plotH - (plotH * k) / 4;
    svgEl("line", { x1: left, x2: width - right, y1: y, y2: y, class: "axis" }, svg);
    svgEl("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, svg)
      .textContent = bytes(Math.round((max * k) / 4));
  }
  const slot = plotW / items.length, barW = Math.min(48, slot * 0.36);
  items.forEach((d, i) => {
    const x0 = left + slot * i + slot / 2 - barW;
    [["original", d.original_bytes], ["stored", d.stored_bytes]].forEach(([kind, v], j) => {
      const h = (plotH * v) / max;
      const bar = svgEl("rect", { x: x0 + j * barW, y: top + plotH - h, width: barW - 2,
                                  height: Math.max(h, 0.5), class: "bar " + kind }, svg);
      svgEl("title", {}, bar).textContent = `${d[labelKey]} ${kind}: ${bytes(v)}`;
    });
    svgEl("text", { x: x0 + barW, y: top + plotH - (plotH * d.original_bytes) / max - 5,
                    "text-anchor": "middle", class: "label" }, svg)
      .textContent = "ratio " + ratio(d.ratio);
    svgEl("text", { x: x0 + barW, y: height - bottom + 16, "text-anchor": "middle",
                    class: "label" }, svg).textContent = d[labelKey];
  });
}

function studyRow(tbody, s) {
  const row = tbody.insertRow();
  row.className = "study";
  row.dataset.uid = s.study_uid;
  cell(row, (state.open.has(s.study_uid) ? "▾ " : "▸ ") + (s.patient_name || s.patient_id));
  cell(row, s.study_date);
  cell(row, s.description);
  cell(row, s.modalities.join(", "));
  cell(row, s.series.length, "num");
  cell(row, count(s.instances), "num");
  cell(row, bytes(s.original_bytes), "num");
  cell(row, bytes(s.stored_bytes), "num");
  cell(row, ratio(s.ratio), "num ratio");
  cell(row, when(s.received));
  row.addEventListener("click", () => {
    state.open.has(s.study_uid) ? state.open.delete(s.study_uid) : state.open.add(s.study_uid);
    loadStudies();
  });
  if (state.open.has(s.study_uid)) {
    s.series.forEach((se) => seriesRow(tbody, s, se));
    actionsRow(tbody, s);
  }
}

// What can be done with a whole study: download it as a DICOM file-set (a ZIP with a
// DICOMDIR, for a CD or a USB stick) or as de-identified copies, list or download all its
// patient's studies, or send it to a configured destination (as a C-MOVE).
function actionsRow(tbody, s) {
  const row = tbody.insertRow();
  row.className = "series send";
  const td = row.insertCell();
  td.colSpan = 10;
  const zip = `api/studies/${enc(s.study_uid)}/media.zip`;
  td.append(downloadLink(zip, "Download (DICOMDIR, ZIP)",
                         "the study's instances as received, with a DICOMDIR: for a CD or a USB stick"),
            " (", downloadLink(zip + "?profile=STD-GEN-CD", "STD-GEN-CD",
                               "every file in Explicit VR Little Endian, converted losslessly " +
                               "where received otherwise: for an old viewer"), ")",
            " · ", downloadLink(`api/studies/${enc(s.study_uid)}/deidentified.zip`,
                                "De-identified (ZIP)",
                                "copies without the patient's identity, for a teaching file " +
                                "or research: pseudonym, new UIDs, shifted dates; images " +
                                "that may show names in their pixels left out"));
  if (s.patient_studies > 1 && state.patient === null) {
    const all = document.createElement("a");
    all.className = "patient";
    all.href = patientHash(s.patient_id);
    all.textContent = `this patient's ${s.patient_studies} studies`;
    all.addEventListener("click", (event) => event.stopPropagation());
    td.append(" · ", all, " (", patientDownload(s.patient_id, "all in one DICOMDIR, ZIP"), ")");
  }
  sendControls(td, s);
  holdControls(td, s);
}

function downloadLink(path, text, title) {
  const link = document.createElement("a");
  link.className = "download";
  link.href = withToken(path);
  link.textContent = text;
  link.title = title;
  link.addEventListener("click", (event) => event.stopPropagation());
  return link;
}

// A patient's studies (the Patient ID exactly), oldest first, as one file-set: their CD.
const patientDownload = (id, text) =>
  downloadLink(`api/media.zip?patient=${enc(id)}`, text,
               "every study of the patient as received, with one DICOMDIR: for the patient's CD");
const patientHash = (id) => `#patient/${enc(id)}`;

// While the table lists one patient's studies (#patient/{id}), the search bar says so, with
// their download and a way back to all patients.
function renderPatientFilter(page) {
  const box = byId("search-patient");
  box.hidden = state.patient === null;
  if (box.hidden) return;
  const first = page.items[0];
  const who = first ? `${first.patient_name || "(no name)"} (${state.patient})` : state.patient;
  const back = document.createElement("a");
  back.href = "#";
  back.textContent = "✕ all patients";
  box.replaceChildren(`Patient ${who}: ${count(page.total)} studies · `,
                      patientDownload(state.patient, "Download all (DICOMDIR, ZIP)"), " · ", back);
}

// A button that runs ``act`` (async, returning what to say) when clicked, saying ``busy``
// meanwhile; the answer, or the error, goes beside it.
function actionButton(label, busy, act) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  const note = document.createElement("span");
  note.className = "muted";
  button.addEventListener("click", async () => {
    button.disabled = true;
    note.textContent = ` ${busy}…`;
    try {
      note.textContent = " " + await act();
    } catch (err) {
      note.textContent = " " + String(err.message || err);
    } finally {
      button.disabled = false;
    }
  });
  const box = document.createElement("span");
  box.append(button, note);
  return box;
}

// "hold": keep the study from every deletion until released (a claim, an investigation).
function holdControls(td, s) {
  if (state.role !== "admin") return;
  const reason = document.createElement("input");
  reason.className = "hold-reason";
  reason.placeholder = "reason (claim, request)";
  td.append(" · ", reason, " ", actionButton("Hold study", "placing the hold", async () => {
    const [response, answer] = await postJson("api/holds",
                                              { level: "study", uid: s.study_uid,
                                                reason: reason.value });
    if (response.ok) setTimeout(refresh, 1000);
    return response.status === 201 ? "on hold: nothing of it is deleted until released"
      : response.ok ? `already on hold (${answer.reason})` : answer.error;
  }));
}

// "send to ...": the whole study to a configured destination (as a C-MOVE would).
function sendControls(td, s) {
  const names = Object.keys(state.destinations || {});
  if (!names.length || state.role !== "admin") return;   // a viewer may only read
  const select = document.createElement("select");
  names.forEach((n) => select.add(new Option(`${n} (${state.destinations[n]})`, n)));
  td.append(" · Send to ", select, " ", actionButton("Send study", "sending", async () => {
    const [response, answer] = await postJson(`api/studies/${enc(s.study_uid)}/send`,
                                              { destination: select.value });
    return response.ok
      ? `${answer.instances} instances of ${answer.series} series on their way to ` +
        `${answer.destination}; the Forwarding panel shows how it went`
      : answer.error;
  }));
}

function seriesRow(tbody, study, se) {
  const row = tbody.insertRow();
  row.className = "series";
  row.dataset.uid = se.series_uid;
  row.title = "open the series viewer";
  row.addEventListener("click", () => {
    location.hash = viewHash(study.study_uid, se.series_uid);
  });
  const name = cell(row, `${se.modality} series ${se.series_number}`);
  name.prepend(thumbnail(se.series_uid));
  cell(row, se.series_uid, "uid").colSpan = 2;
  cell(row, se.description + (se.sources && se.sources.length
    ? ` · from ${se.sources.join(", ")}` : ""));
  cell(row, se.staged_instances ? se.staged_instances + " staged" : "compressed");
  cell(row, count(se.instances), "num");
  cell(row, bytes(se.original_bytes), "num");
  cell(row, bytes(se.stored_bytes), "num");
  cell(row, ratio(se.ratio), "num ratio");
  cell(row, when(se.last_received));
}

// The series' middle image.
function thumbnail(uid) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "";
  img.loading = "lazy";
  img.src = withToken(`/api/series/${encodeURIComponent(uid)}/preview.png?size=64`);
  img.addEventListener("error", () => img.remove());   // no image to show for this series
  return img;
}

// --- series viewer: each image as the node renders it (WADO-RS), scrolled in instance order ---
const WINDOWS = [["as stored", ""], ["soft tissue", "40,400"], ["lung", "-600,1500"],
                 ["bone", "400,1800"], ["brain", "40,80"]];
const viewer = { images: [], index: 0, window: "", path: "" };
const enc = encodeURIComponent;
const viewHash = (study, series, index) =>
  `#view/${enc(study)}/${enc(series)}` + (index ? `/${index + 1}` : "");
const value = (record, tag) => ((record[tag] || {}).Value || [])[0];

// The series' images (each instance's frames, in instance number order) and a title for it,
// from a QIDO-RS search.
async function seriesImages(path) {
  const records = await api(`${path}/instances?includefield=00200013&includefield=00280008`);
  records.sort((a, b) => (value(a, "00200013") || 0) - (value(b, "00200013") || 0));
  const first = records[0] || {};
  const name = value(first, "00100010");
  const title = [name && (name.Alphabetic || name), value(first, "00080060"),
                 value(first, "00200011") && `series ${value(first, "00200011")}`,
                 value(first, "0008103E")].filter(Boolean).join(" · ");
  const images = records.flatMap((r) => {
    const uid = value(r, "00080018"), frames = Number(value(r, "00280008") || 1);
    const base = `${path}/instances/${enc(uid)}`;
    return frames > 1 ? Array.from({ length: frames }, (_, f) => `${base}/frames/${f + 1}`)
                      : [base];
  });
  return { images, title };
}

function imageUrl(i) {
  const query = new URLSearchParams();
  if (viewer.window) query.set("window", viewer.window);
  if (token) query.set("token", token);          // an img cannot send a header
  const q = query.toString();
  return `${viewer.images[i]}/rendered` + (q ? "?" + q : "");
}

function showImage(i) {
  if (!viewer.images.length) return;
  viewer.index = Math.max(0, Math.min(viewer.images.length - 1, i));
  byId("viewer-img").src = imageUrl(viewer.index);
  byId("viewer-slider").value = viewer.index;
  setText("viewer-pos", `${viewer.index + 1} / ${viewer.images.length}`);
  for (let k = 1; k <= 3; k++) {                 // the next images, ready when scrolled to
    if (viewer.index + k < viewer.images.length) new Image().src = imageUrl(viewer.index + k);
  }
}

function windowButtons() {
  const group = byId("viewer-windows");
  group.replaceChildren();
  WINDOWS.forEach(([label, win]) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.title = win ? `window ${win} (center, width)` : "the instance's own window";
    button.className = win === viewer.window ? "on" : "";
    button.addEventListener("click", () => {
      viewer.window = win;
      windowButtons();
      showImage(viewer.index);
    });
    group.appendChild(button);
  });
}

// #view/{study}/{series}[/{image}] opens the viewer (a link to a series can be shared);
// #study/{study} opens the study's row, found by a search for its UID (on whatever page);
// #patient/{id} lists that patient's studies only, until "all patients" (an empty #).
async function openFromHash() {
  const study = location.hash.match(/^#study\/([^/]+)$/);
  const patient = location.hash.match(/^#patient\/(.*)$/);
  const before = state.patient;
  if (study) {
    const uid = decodeURIComponent(study[1]);
    state.open.add(uid);
    state.patient = null;
    byId("search-text").value = uid;
  } else if (patient) {
    state.patient = decodeURIComponent(patient[1]);
  } else if (!location.hash.startsWith("#view/")) {
    state.patient = null;
  }
  if (study || patient || before !== state.patient) {
    state.offset = 0;
    loadStudies().catch(() => {});
    if (before !== state.patient) loadAccesses().then(renderAccesses).catch(() => {});
  }
  const m = location.hash.match(/^#view\/([^/]+)\/([^/]+)(?:\/(\d+))?$/);
  const dialog = byId("viewer");
  if (!m) { if (dialog.open) dialog.close(); return; }
  const path = `dicom-web/studies/${m[1]}/series/${m[2]}`;
  if (path !== viewer.path) {
    viewer.path = path;
    viewer.images = [];
    setText("viewer-title", decodeURIComponent(m[2]));
    setText("viewer-pos", "loading…");
    if (!dialog.open) dialog.showModal();
    try {
      const found = await seriesImages(path);
      viewer.images = found.images;
      if (found.title) setText("viewer-title", found.title);
    } catch (err) {
      setText("viewer-pos", String(err.message || err));
      return;
    }
    byId("viewer-slider").max = Math.max(0, viewer.images.length - 1);
    windowButtons();
  }
  if (!dialog.open) dialog.showModal();
  showImage(m[3] ? Number(m[3]) - 1 : Math.floor(viewer.images.length / 2));
}

byId("viewer-slider").addEventListener("input", (e) => showImage(Number(e.target.value)));
byId("viewer").addEventListener("wheel", (e) => {
  e.preventDefault();
  showImage(viewer.index + Math.sign(e.deltaY));
}, { passive: false });
byId("viewer").addEventListener("keydown", (e) => {
  const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[e.key];
  if (step) { e.preventDefault(); showImage(viewer.index + step); }
});
byId("viewer").addEventListener("close", () => {
  viewer.path = "";
  if (location.hash.startsWith("#view/")) {
    history.replaceState(null, "", location.pathname + location.search);
  }
});
byId("viewer-close").addEventListener("click", () => byId("viewer").close());
window.addEventListener("hashchange", openFromHash);

function renderStudies(page) {
  state.total = page.total;
  const tbody = byId("studies").tBodies[0];
  tbody.replaceChildren();
  page.items.forEach((s) => studyRow(tbody, s));
  const searching = state.patient !== null ||
    ["search-text", "search-modality", "search-from", "search-to"].some((id) => byId(id).value);
  if (!page.items.length) {
    cell(tbody.insertRow(), searching ? "No study matches the search." : "No study stored yet.")
      .colSpan = 10;
  }
  const last = Math.min(state.offset + PAGE_SIZE, page.total);
  setText("page-info", page.total ? `${state.offset + 1}–${last} of ${page.total}` : "");
  byId("prev").disabled = state.offset === 0;
  byId("next").disabled = last >= page.total;
  document.querySelectorAll("#studies th[data-sort]").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.sort === state.sort);
    th.classList.toggle("asc", th.dataset.sort === state.sort && state.order === "asc");
  });
}

function jobList(parent, title, items, describe) {
  const h = document.createElement("h3");
  h.textContent = `${title} (${items.length})`;
  parent.appendChild(h);
  const ul = document.createElement("ul");
  items.slice(0, 20).forEach((item) => {
    const li = document.createElement("li");
    const uid = document.createElement("span");
    uid.className = "uid";
    uid.textContent = item.series_uid;
    li.append(uid, " ", describe(item));
    ul.appendChild(li);
  });
  parent.appendChild(ul);
}

function renderJobs(jobs) {
  const box = byId("jobs");
  box.replaceChildren();
  box.className = "jobs";
  jobList(box, "Pending", jobs.pending,
    (j) => `${j.modality}: ${j.staged_instances} instances, ${bytes(j.staged_bytes)}`);
  jobList(box, "Running", jobs.running, (j) => `attempt ${j.attempts} since ${when(j.updated_at)}`);
  jobList(box, "Failed", jobs.failed, (j) => {
    const span = document.createElement("span");
    span.className = "reason";
    span.textContent = `${j.reason} (attempt ${j.attempts}, retry ${when(j.next_attempt)})`;
    return span;
  });
}

// Forwarding to destinations: shown when the node forwards (failed first, then the latest).
function renderForwards(rows, config) {
  const box = byId("forwards");
  box.replaceChildren();
  byId("forwards-panel").hidden = !Object.keys(config.forward || {}).length && !rows.length;
  const failed = rows.filter((r) => r.state === "failed");
  jobList(box, "Failed", failed, (r) => {
    const span = document.createElement("span");
    span.className = "reason";
    span.textContent = `to ${r.destination}${r.by_hand ? " (sent by hand)" : ""}: ` +
      `${r.reason} (attempt ${r.attempts}, ` +
      (r.next_attempt ? `retry ${when(r.next_attempt)})` : "not retried by itself)");
    return span;
  });
  jobList(box, "Queued", rows.filter((r) => r.state === "queued"),
    (r) => `${r.modality} to ${r.destination}: sent by hand, queued ${when(r.updated_at)}`);
  jobList(box, "Sent", rows.filter((r) => r.state === "sent"),
    (r) => `${r.modality} to ${r.destination}: ${count(r.instances)} instances, ` +
           `last ${when(r.updated_at)}`);
}

function renderConfig(config) {
  const dl = byId("config");
  dl.replaceChildren();
  setText("node-title", `${config.ae_title} · DICOM port ${config.port}`);
  const shown = ["ae_title", "host", "port", "data_dir", "database_url", "stable_age",
                 "duplicate_policy", "max_storage_bytes", "codec_model", "codec_slab",
                 "http_host", "http_port", "http_token_required"];
  for (const key of shown) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = key;
    dd.textContent = key === "database_url" && !config[key] ? "(SQLite in data_dir)"
      : String(config[key]);
    dl.append(dt, dd);
  }
  for (const key of ["destinations", "forward"]) {
    const entries = Object.entries(config[key] || {});
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = key;
    dd.textContent = entries.length
      ? entries.map(([n, v]) => `${n} = ${v || "(every series)"}`).join("; ") : "(none)";
    dl.append(dt, dd);
  }
}

// An audit trail as a list: when, what level and UID, then ``text(row)`` and the reason;
// ``decorate(li, row)``, when given, adds to each item.
function auditList(id, rows, empty, at, text, decorate = null) {
  const ul = byId(id);
  ul.replaceChildren();
  if (!rows.length) {
    const li = document.createElement("li");
    li.textContent = empty;
    ul.appendChild(li);
  }
  rows.slice(0, 20).forEach((row) => {
    const li = document.createElement("li");
    const uid = document.createElement("span");
    uid.className = "uid";
    uid.textContent = row.uid;
    li.append(`${when(row[at])} ${row.level} `, uid,
              `: ${text(row)}` + (row.reason ? ` (${row.reason})` : ""));
    if (decorate) decorate(li, row);
    ul.appendChild(li);
  });
}

function renderDeletions(rows) {
  auditList("deletions", rows, "No deletion recorded.", "deleted_at", (d) => {
    const counts = [`${count(d.instances)} instances`];
    if (d.series) counts.push(`${d.series} series`);
    if (d.studies) counts.push(`${d.studies} studies`);
    return `${counts.join(", ")}, ${bytes(d.freed_bytes)} freed`;
  });
}

// The recycle bin: deletions that can still be undone, each with Restore for admins.
function renderRecycle(bin) {
  setText("recycle-scope", bin.keep_days > 0
    ? `(deleted instances kept ${bin.keep_days} days)` : "(off: deletions are for good)");
  auditList("recycle", bin.entries.slice().reverse(), "Nothing to restore.", "deleted_at",
            (e) => `${count(e.instances)} instances of ${e.patients.join(", ")}, ` +
                   `${bytes(e.bytes)}` +
                   (e.held && e.held.length ? ", kept while on hold"
                    : e.expires_at ? `, until ${when(e.expires_at)}` : ""),
            (li, e) => {
              li.className = "recycled";
              // originals of corrected held instances: the archive still holds them
              if (state.role === "admin" && e.kind !== "original") {
                li.append(" ", restoreButton(e.entry));
              }
            });
}

// The retention rules the node applies each night, and what its last run did.
function renderRetention(config, last) {
  const rules = Object.entries(config.retention || {});
  if (!rules.length) {
    setText("retention", "No retention rules: nothing is deleted for its age.");
    byId("retention-now").hidden = true;
    return;
  }
  const hour = config.retention_hour;
  const at = hour >= 0 ? `applied daily at ${String(hour).padStart(2, "0")}:00`
                       : "not applied by the node itself";
  let text = `Retention rules, ${at}: ` +
    rules.map(([name, rule]) => `${name} (${rule})`).join("; ") + ".";
  if (last) {
    const runs = last.rules || [];
    const total = (f) => runs.reduce((n, r) => n + f(r), 0);
    const failed = total((r) => Object.keys(r.failed).length);
    const held = total((r) => r.held_back);
    const onHold = total((r) => r.on_hold || 0);
    text += ` Last run ${when(last.started)}: ` + (last.error ? "failed, see the log." :
      `${count(total((r) => r.deleted))} records, ` +
      `${count(total((r) => r.deleted_instances))} instances deleted` +
      (failed ? `, ${count(failed)} failed` : "") +
      (held ? `, ${count(held)} held back as recent arrivals` : "") +
      (onHold ? `, ${count(onHold)} on legal hold` : "") + ".");
  }
  setText("retention", text);
  const now = byId("retention-now");
  if (now.hidden) {       // once: a look at what the rules select takes a query per rule
    now.hidden = false;
    now.replaceChildren(actionButton("What they select now", "looking", async () => {
      const answer = await api("api/retention");
      return answer.map((r) => `${r.rule}: ${count(r.selected)}` +
        (r.held_back ? `, ${count(r.held_back)} held back as recent` : "") +
        (r.on_hold ? `, ${count(r.on_hold)} on legal hold` : "")).join("; ");
    }));
  }
}

// Legal holds in force: who placed each, when, why.
function renderHolds(rows) {
  auditList("holds", rows, "No study or patient on hold.", "held_at",
            (h) => `on hold${h.through ? ` with patient ${h.through}` : ""}, ` +
                   `placed by ${h.held_by}`,
            (li, h) => {
              if (state.role === "admin" && !h.through) {
                li.append(" ", actionButton("Release", "releasing", async () => {
                  const [response, answer] = await postJson("api/holds/release",
                                                            { level: h.level, uid: h.uid });
                  if (response.ok) setTimeout(refresh, 1000);
                  return response.ok ? "released" : answer.error;
                }));
              }
            });
}

function restoreButton(entry) {
  return actionButton("Restore", "restoring", async () => {
    const [response, answer] = await postJson(`api/deleted/${enc(entry)}/restore`, {});
    if (response.ok) setTimeout(refresh, 1500);     // the entry leaves the list
    return answer.error ||
      `${answer.restored} restored, ${answer.present} already there, ${answer.failed} failed`;
  });
}

// Patients' corrections: what changed from what to what, and why.
function renderCorrections(rows) {
  auditList("corrections", rows, "No correction recorded.", "corrected_at",
            (c) => `${count(c.instances)} instances of ${c.studies} studies; ${c.changes}`);
}

// The access trail: who read which study, how, when (a row adds up a minute's repeats).
function renderAccesses(rows) {
  const table = byId("accesses");
  const tbody = table.tBodies[0];
  tbody.replaceChildren();
  setText("accesses-scope", state.patient === null ? "(newest first)"
    : `(patient ${state.patient}, newest first)`);
  if (!rows.length) cell(tbody.insertRow(), "No access recorded.").colSpan = 6;
  rows.forEach((a) => {
    const row = tbody.insertRow();
    const first = when(a.first_at), last = when(a.last_at);
    cell(row, first === last ? first : `${first} – ${last.slice(11)}`);
    cell(row, a.actor);
    cell(row, a.action);
    const study = cell(row, "", "uid");
    if (a.study_uid) {
      const link = document.createElement("a");
      link.href = `#study/${enc(a.study_uid)}`;
      link.textContent = a.study_uid;
      study.append(link, a.patient_id ? ` (patient ${a.patient_id})` : "");
    } else {
      study.textContent = a.patient_id ? `patient ${a.patient_id}` : "";
    }
    const counts = [];
    if (a.instances) counts.push(`${count(a.instances)} instances`);
    if (a.requests > 1) counts.push(`${count(a.requests)} requests`);
    cell(row, counts.join(", "), "num");
    cell(row, a.detail);
  });
}

async function loadStudies() {
  const query = new URLSearchParams({ sort: state.sort, order: state.order,
                                      offset: state.offset, limit: PAGE_SIZE });
  const dates = (id) => byId(id).value.replaceAll("-", "");     // YYYY-MM-DD -> YYYYMMDD
  for (const [name, value] of [["q", byId("search-text").value.trim()],
                               ["modality", byId("search-modality").value.trim()],
                               ["from", dates("search-from")], ["to", dates("search-to")]]) {
    if (value) query.set(name, value);
  }
  if (state.patient !== null) query.set("patient", state.patient);
  const page = await api(`api/studies?${query}`);
  renderStudies(page);
  renderPatientFilter(page);
}

const loadAccesses = () => api("api/accesses?limit=40" +
  (state.patient === null ? "" : "&patient=" + enc(state.patient)));

// The search: the first page of what matches, a moment after the last keystroke.
let searchTimer = null;
byId("study-search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => { state.offset = 0; loadStudies(); }, 300);
});
byId("study-search").addEventListener("submit", (event) => event.preventDefault());

async function refresh() {
  try {
    const [stats, jobs, config, deletions, forwards, accesses, corrections, recycle, held] =
      await Promise.all([api("api/stats"), api("api/jobs"), api("api/config"),
                         api("api/deletions?limit=20"), api("api/forwards?limit=40"),
                         loadAccesses(), api("api/corrections?limit=20"),
                         api("api/deleted?limit=20"), api("api/holds")]);
    renderTotals(stats);
    barChart(byId("chart-modality"), stats.by_modality, "modality");
    barChart(byId("chart-time"), stats.by_day.slice(-30), "day");
    renderJobs(jobs);
    state.destinations = config.destinations;
    state.role = config.you.role;
    byId("import-panel").hidden = state.role !== "admin";
    setText("who", config.you.user ? `${config.you.user} (${config.you.role})` : "");
    renderForwards(forwards, config);
    renderConfig(config);
    renderDeletions(deletions);
    renderRecycle(recycle);
    renderRetention(config, recycle.retention);
    renderHolds(held);
    renderAccesses(accesses);
    renderCorrections(corrections);
    await loadStudies();
    byId("status").className = "status";
    setText("status", "updated " + new Date().toLocaleTimeString());
  } catch (err) {
    byId("status").className = "status error";
    setText("status", String(err.message || err));
  }
}

document.querySelectorAll("#studies th[data-sort]").forEach((th) => {
  th.addEventListener("click", () => {
    const key = th.dataset.sort;
    state.order = state.sort === key && state.order === "desc" ? "asc" : "desc";
    state.sort = key;
    state.offset = 0;
    loadStudies();
  });
});
byId("prev").addEventListener("click", () => {
  state.offset = Math.max(0, state.offset - PAGE_SIZE);
  loadStudies();
});
byId("next").addEventListener("click", () => {
  state.offset += PAGE_SIZE;
  loadStudies();
});
// Importing files: through STOW-RS (upload.js), then the studies table shows them.
async function importFiles(files) {
  const status = byId("import-status");
  const list = byId("import-failures");
  list.replaceChildren();
  const result = await VoxarcUpload.send(Array.from(files), {
    token,
    onProgress: (done, total) => { status.textContent = `sending ${done} of ${total} files…`; },
  });
  const reasons = { 0xA700: "no room", 0xA900: "another study", 0xC210: "cannot be parsed",
                    0xC220: "duplicate refused" };
  status.textContent = `${count(result.stored.length)} instances stored, ` +
    `${count(result.failed.length)} failed, ${count(result.skipped.length)} files passed over ` +
    "(not DICOM instances, or a DICOMDIR)";
  result.failed.slice(0, 20).forEach((f) => {
    const li = document.createElement("li");
    li.textContent = f.error ? `${f.file}: ${f.error}`
      : `${f.uid || "(no UID)"}: ${reasons[f.reason] || "0x" + f.reason.toString(16)}`;
    list.appendChild(li);
  });
  loadStudies();
}

for (const id of ["import-folder", "import-files"]) {
  byId(id).addEventListener("change", (event) => {
    importFiles(event.target.files);
    event.target.value = "";
  });
}
const dropZone = byId("import-panel");
dropZone.addEventListener("dragover", (event) => { event.preventDefault(); });
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  importFiles(event.dataTransfer.files);
});

refresh();
openFromHash();
setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
