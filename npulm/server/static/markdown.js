// Markdown -> DOM for model output: code fences, headings, lists, quotes, paragraphs, `code`, **bold**, *italic*,
// and http(s) links. It builds nodes with textContent and never assigns HTML, so nothing the model writes can
// become markup or script (written here instead of shipping a Markdown library plus an HTML sanitizer: the
// construction itself is the guarantee, and there is no third-party code to keep patched).
"use strict";

function mdInline(parent, text) {
  const re = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g;
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    let el;
    if (m[1]) { el = document.createElement("code"); el.textContent = m[2]; }
    else if (m[3] !== undefined) { el = document.createElement("strong"); mdInline(el, m[3]); }
    else if (m[4] !== undefined) { el = document.createElement("em"); mdInline(el, m[4]); }
    else {
      el = document.createElement("a");
      el.href = m[6];  // only http(s) URLs match the pattern
      el.rel = "noopener noreferrer";
      el.target = "_blank";
      el.textContent = m[5];
    }
    parent.appendChild(el);
    last = re.lastIndex;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  const para = [];
  const flush = () => {
    if (!para.length) return;
    const p = document.createElement("p");
    para.forEach((line, k) => { if (k) p.appendChild(document.createElement("br")); mdInline(p, line); });
    root.appendChild(p);
    para.length = 0;
  };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = /^\s*(```|~~~)\s*([\w+-]*)\s*$/.exec(line))) {  // fenced code (an unclosed fence runs to the end)
      flush();
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) body.push(lines[i]);
      i++;
      const pre = document.createElement("pre"), code = document.createElement("code");
      if (m[2]) code.dataset.lang = m[2];
      code.textContent = body.join("\n");
      pre.appendChild(code);
      root.appendChild(pre);
    } else if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
      flush();
      const h = document.createElement("h" + Math.min(m[1].length + 2, 6));
      mdInline(h, m[2]);
      root.appendChild(h);
      i++;
    } else if (/^\s*([-*+]|\d+[.)])\s+/.test(line)) {
      flush();
      const ordered = /^\s*\d/.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length && /^\s*([-*+]|\d+[.)])\s+/.test(lines[i])) {
        const li = document.createElement("li");
        mdInline(li, lines[i].replace(/^\s*([-*+]|\d+[.)])\s+/, ""));
        list.appendChild(li);
        i++;
      }
      root.appendChild(list);
    } else if (/^>\s?/.test(line)) {
      flush();
      const q = document.createElement("blockquote");
      while (i < lines.length && /^>\s?/.test(lines[i])) { para.push(lines[i].replace(/^>\s?/, "")); i++; }
      const inner = renderMarkdown(para.splice(0).join("\n"));
      q.appendChild(inner);
      root.appendChild(q);
    } else if (!line.trim()) {
      flush();
      i++;
    } else {
      para.push(line);
      i++;
    }
  }
  flush();
  return root;
}
