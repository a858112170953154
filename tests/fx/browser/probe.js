// Measures what a reader sees in every marked row of a regbn report: the WCAG contrast of each
// piece of text against the background actually behind it, and each cell's alignment. The
// result goes into <pre id="probe"> as JSON, which `chromium --dump-dom` hands to the test.
function rgba(text) {
  const parts = text.match(/rgba?\(([^)]+)\)/)[1].split(",").map(Number);
  return [parts[0], parts[1], parts[2], parts.length > 3 ? parts[3] : 1];
}
function over(top, below) {
  const a = top[3];
  return [0, 1, 2].map((i) => top[i] * a + below[i] * (1 - a)).concat([1]);
}
function background(el) {
  const layers = [];
  for (let e = el; e; e = e.parentElement) {
    const c = rgba(getComputedStyle(e).backgroundColor);
    if (c[3] > 0) layers.push(c);
    if (c[3] >= 1) break;
  }
  let colour = [255, 255, 255, 1];
  for (const layer of layers.reverse()) colour = over(layer, colour);
  return colour;
}
function luminance(c) {
  const lin = c.slice(0, 3).map((v) => {
    v /= 255;
    return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
  });
  return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
}
function contrast(a, b) {
  const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
  return (hi + 0.05) / (lo + 0.05);
}
const out = [];
for (const row of document.querySelectorAll(".regbn-report tr.fusion, .regbn-report tr.regbn, .regbn-report tr.failed")) {
  for (const el of row.querySelectorAll("td, td *")) {
    const own = Array.from(el.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const bg = background(el);
    const style = getComputedStyle(el);
    const fg = over(rgba(style.color), bg);
    out.push({
      row: row.className,
      text: el.textContent.trim(),
      contrast: contrast(fg, bg),
      align: el.tagName === "TD" ? style.textAlign : null,
      numeric: el.classList.contains("num"),
    });
  }
}
const first = document.querySelector(".regbn-report td");
out.push({ row: "first-cell", text: first.textContent, align: getComputedStyle(first).textAlign });
document.getElementById("probe").textContent = JSON.stringify(out);
