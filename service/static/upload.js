// voxarc admin page: importing DICOM files from the browser (a CD from another hospital, a USB
// stick, files mailed in) through STOW-RS, the ingest path of C-STORE.
"use strict";

const VoxarcUpload = (() => {
  const BATCH_BYTES = 64e6;     // a STOW-RS request: the node holds its body while it stores it
  const BATCH_FILES = 200;

  // A Part 10 file ("DICM" after the preamble), and not a media directory: the DICOMDIR
  // indexes the files, which are sent themselves.
  async function isInstance(file) {
    if (file.name.toUpperCase() === "DICOMDIR" || file.size < 132) return false;
    const magic = new Uint8Array(await file.slice(128, 132).arrayBuffer());
    return String.fromCharCode(...magic) === "DICM";
  }

  // Files in requests of at most BATCH_BYTES (or one file) and BATCH_FILES.
  function batches(files, maxBytes = BATCH_BYTES, maxFiles = BATCH_FILES) {
    const out = [];
    let current = [], size = 0;
    for (const file of files) {
      if (current.length && (size + file.size > maxBytes || current.length >= maxFiles)) {
        out.push(current);
        current = [];
        size = 0;
      }
      current.push(file);
      size += file.size;
    }
    if (current.length) out.push(current);
    return out;
  }

  // The multipart/related body of a STOW-RS request: each file a part, as it is.
  function stowBody(files, boundary) {
    const parts = [];
    for (const file of files) {
      parts.push(`--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`, file, "\r\n");
    }
    parts.push(`--${boundary}--\r\n`);
    return new Blob(parts);
  }

  // What a STOW-RS answer says: stored SOP Instance UIDs, and failures with their reason.
  function outcome(answer) {
    const items = (tag) => ((answer && answer[tag] && answer[tag].Value) || []);
    const value = (item, tag) => (item[tag] && item[tag].Value ? item[tag].Value[0] : "");
    return {
      stored: items("00081199").map((item) => value(item, "00081155")),
      failed: items("00081198").map((item) => ({
        uid: value(item, "00081155"),
        reason: Number(value(item, "00081197") || 0),
      })),
    };
  }

  // Send ``files`` to the node at ``base``; ``onProgress(done, total)`` after each request.
  // Resolves to {stored: [UID], failed: [{uid, reason, error?}], skipped: [file name]}.
  async function send(files, { base = "", token = "", onProgress = () => {},
                               maxBytes = BATCH_BYTES } = {}) {
    const result = { stored: [], failed: [], skipped: [] };
    const wanted = [];
    for (const file of files) {
      (await isInstance(file)) ? wanted.push(file) : result.skipped.push(file.name);
    }
    let done = 0;
    onProgress(done, wanted.length);
    for (const batch of batches(wanted, maxBytes)) {
      const boundary = "voxarc-" + Math.random().toString(16).slice(2);
      const headers = {
        "Content-Type": `multipart/related; type="application/dicom"; boundary=${boundary}`,
        Accept: "application/dicom+json",
      };
      if (token) headers.Authorization = "Bearer " + token;
      try {
        const response = await fetch(`${base}/dicom-web/studies`, {
          method: "POST", headers, body: stowBody(batch, boundary),
        });
        const text = await response.text();
        if (![200, 202, 409].includes(response.status)) {
          throw new Error(`HTTP ${response.status} ${text.slice(0, 200)}`);
        }
        const { stored, failed } = outcome(text ? JSON.parse(text) : {});
        result.stored.push(...stored);
        result.failed.push(...failed);
      } catch (err) {
        batch.forEach((file) => result.failed.push({ uid: "", reason: 0, file: file.name,
                                                      error: String(err.message || err) }));
      }
      done += batch.length;
      onProgress(done, wanted.length);
    }
    return result;
  }

  return { isInstance, batches, stowBody, outcome, send };
})();
