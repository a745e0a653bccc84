"""The ``haltrace explain`` page: the image, the answer as a strip of tokens coloured by a score, and, for the
chosen token, its maps over the image and its curves over layers. One self-contained HTML file: plotly.js is
inlined once (no CDN), the numbers travel as one JSON block, and a small script draws everything in the
browser, so the page works with no Python running.

``render_fragment`` gives the same view as a block to put in another page that already holds plotly.js (the
demo report puts three of them in one file).

>>> import haltrace
>>> explanation = haltrace.explain(model, img, "caption :", max_new_tokens=2)   # a tiny random model
>>> html = render_page(explanation.data)
>>> html.lstrip().lower().startswith("<!doctype html>")
True
"""

from __future__ import annotations

import html
import json
from typing import Any

_CSS = """
.hx{font-family:sans-serif;max-width:1180px;margin:0 auto 2em auto;color:#222}
.hx h2{margin:.4em 0}.hx .meta{color:#555;font-size:13px;margin:.2em 0 .6em 0}
.hx .answers{display:flex;gap:18px;flex-wrap:wrap}.hx .answer{flex:1;min-width:320px}
.hx .answer h4{margin:.3em 0;font-size:14px}
.hx .strip{display:flex;flex-wrap:wrap;gap:3px;padding:6px;border:1px solid #ddd;border-radius:4px;background:#fafafa}
.hx .tok{cursor:pointer;padding:3px 5px;border-radius:3px;border:2px solid transparent;font-family:monospace;
 font-size:15px;white-space:pre;position:relative}
.hx .tok.sel{outline:2px solid #1f4e9c;outline-offset:1px}
.hx .tok.hallucinated{border-color:#c0392b}.hx .tok.real{border-color:#27ae60}
.hx .tok.changed{text-decoration:underline wavy #e67e22}
.hx .tok sup{font-size:10px;margin-left:2px}
.hx .controls{display:flex;gap:16px;align-items:center;flex-wrap:wrap;margin:.7em 0;font-size:13px}
.hx .figs{display:grid;grid-template-columns:1fr 1fr;gap:8px}.hx .fig{min-height:330px}
.hx .note{padding:10px;border:1px dashed #c0392b;color:#7b241c;background:#fdf2f0;border-radius:4px;font-size:13px}
.hx table{border-collapse:collapse;font-size:13px;margin:.5em 0}
.hx td,.hx th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
.hx .legend{font-size:12px;color:#555}
"""

# the page's script: one function that builds a view inside ``root`` from ``data`` (see haltrace.explain.core)
_JS = r"""
window.haltraceExplain = window.haltraceExplain || function(root, data){
  const $ = (sel) => root.querySelector(sel);
  const grid = data.grid, L = data.n_layers;
  const scoreKeys = Object.keys(data.scores);
  const st = {answer: 0, token: 0, layer: data.default_layer, view: 0,
              score: scoreKeys.length ? scoreKeys[0] : null};
  // open on the first hallucinated object word, else the first object word, else token 0
  const first = data.answers[0].tokens;
  let pick = first.findIndex(t => t.verdict === 'hallucinated');
  if (pick < 0) pick = first.findIndex(t => t.object);
  st.token = Math.max(0, pick);
  const fmt = (v, d) => (v === null || v === undefined) ? '–' :
      (Math.abs(v) >= 1e-3 || v === 0 ? Number(v).toFixed(d === undefined ? 3 : d) : Number(v).toExponential(2));
  const esc = (s) => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));

  function scoreRange(key){
    const info = data.scores[key];
    if (info && info.range) return info.range;
    const vals = [];
    data.answers.forEach(a => a.tokens.forEach(t => { if (t[key] !== undefined && t[key] !== null) vals.push(t[key]); }));
    if (!vals.length) return [0, 1];
    const lo = Math.min(...vals), hi = Math.max(...vals);
    return hi > lo ? [lo, hi] : [lo - 1, hi + 1];
  }
  function suspicion(t, key){  // 0 (fine) .. 1 (suspicious), for the strip colour
    if (!key || t[key] === undefined || t[key] === null) return 0;
    const [lo, hi] = scoreRange(key);
    let x = (t[key] - lo) / (hi - lo);
    if (key === 'confidence') x = 1 - x;  // low internal confidence is the warning sign
    return Math.max(0, Math.min(1, x));
  }
  function drawStrips(){
    data.answers.forEach((a, ai) => {
      const box = $('.strip[data-answer="' + ai + '"]');
      box.innerHTML = '';
      a.tokens.forEach((t, ti) => {
        const s = document.createElement('span');
        s.className = 'tok' + (t.verdict ? ' ' + t.verdict : '') + (t.changed ? ' changed' : '') +
                      (ai === st.answer && ti === st.token ? ' sel' : '');
        s.dataset.answer = ai; s.dataset.token = ti;
        const h = suspicion(t, st.score);
        s.style.background = 'rgba(214,48,39,' + (0.08 + 0.8 * h).toFixed(3) + ')';
        s.innerHTML = esc(t.text.trim() || t.text) +
          (t.verdict === 'hallucinated' ? '<sup>&#10007;</sup>' : t.verdict === 'real' ? '<sup>&#10003;</sup>' : '');
        s.title = (st.score ? data.scores[st.score].label + ': ' + fmt(t[st.score]) : '') +
                  (t.object ? '\nobject: ' + t.object + (t.verdict ? ' (' + t.verdict + ')' : '') : '');
        s.addEventListener('click', () => { st.answer = ai; st.token = ti; drawStrips(); drawAll(); });
        box.appendChild(s);
      });
    });
    const lg = $('.legend.score');
    if (st.score){
      const [lo, hi] = scoreRange(st.score);
      lg.textContent = 'colour: ' + data.scores[st.score].label + (st.score === 'confidence' ? ' (darker = lower)' :
        ' (darker = higher)') + ', scale ' + fmt(lo) + ' .. ' + fmt(hi) +
        (data.scores[st.score].range ? '' : ' (this answer\'s range)');
    } else lg.textContent = 'no score to colour by (pass a detector or a probe; a VLM with an image gets the internal confidence)';
  }
  function tokenNow(){ return data.answers[st.answer].tokens[st.token]; }
  function mapTraces(values, title, isRank){
    const v = grid.views[st.view], img = data.image;
    const W = img.width, H = img.height, [bx0, by0, bx1, by1] = v.box;
    const cw = (bx1 - bx0) * W / v.cols, ch = (by1 - by0) * H / v.rows;
    const z = v.cells.map(row => row.map(c => (c < 0 || values[c] === null) ? null :
                                          (isRank ? Math.log10(1 + values[c]) : values[c])));
    const text = v.cells.map(row => row.map(c => c < 0 ? '' : (isRank ? 'rank ' + values[c] : fmt(values[c], 4)) +
                                                     ' (image token ' + c + ')'));
    return [{type: 'image', source: img.data_uri, x0: 0, y0: 0, dx: 1, dy: 1, hoverinfo: 'skip'},
            {type: 'heatmap', z: z, text: text, hoverinfo: 'text', x0: bx0 * W + cw / 2, dx: cw,
             y0: by0 * H + ch / 2, dy: ch, opacity: 0.55, colorscale: isRank ? 'Hot' : 'Viridis',
             reversescale: false, zmin: isRank ? 0 : undefined, showscale: true,
             colorbar: {thickness: 10, len: 0.8, title: {text: isRank ? 'log10(1+rank)' : '', side: 'right'}}}];
  }
  function mapLayout(title){
    const img = data.image;
    return {title: {text: title, font: {size: 13}}, margin: {l: 10, r: 10, t: 40, b: 10}, height: 340,
            xaxis: {range: [0, img.width], visible: false, constrain: 'domain'},
            yaxis: {range: [img.height, 0], visible: false, scaleanchor: 'x'}, showlegend: false};
  }
  function drawMaps(){
    const t = tokenNow(), l = st.layer, word = esc((t.text || '').trim());
    const lensDiv = $('.map-lens'), attnDiv = $('.map-attn');
    if (!grid.spatial || !data.image){
      $('.maps-note').style.display = ''; lensDiv.style.display = 'none'; attnDiv.style.display = 'none';
      return;
    }
    const kind = $('.sel-kind').value;
    const isRank = kind === 'patch_rank';
    Plotly.react(lensDiv, mapTraces(t[kind][l], '', isRank),
      mapLayout('logit lens of "' + word + '" over the image, ' + data.layers[l] + (isRank ? ' (rank; dark = top)' :
                ' (probability)')), {displayModeBar: false, responsive: true});
    if (t.attn_patch){
      Plotly.react(attnDiv, mapTraces(t.attn_patch[l], '', false),
        mapLayout('attention of the position predicting "' + word + '" to the image, ' + data.layers[l] +
                  ' (mean over heads)'), {displayModeBar: false, responsive: true});
    } else {
      attnDiv.innerHTML = '<div class="note">' + esc(data.answers[st.answer].attention_note) + '</div>';
    }
  }
  function drawCurves(){
    const t = tokenNow(), c = t.competitor, xs = data.layers.map((_, i) => i);
    const word = (t.text || '').trim();
    const traces = [
      {x: xs, y: t.lens_rank.map(r => r + 1), name: 'rank of "' + word + '"', mode: 'lines+markers',
       text: t.lens_prob.map(p => 'p = ' + fmt(p, 4)), hovertemplate: 'layer %{x}: rank %{customdata} (%{text})<extra></extra>',
       customdata: t.lens_rank},
      {x: xs, y: c.lens_rank.map(r => r + 1), name: 'rank of "' + c.text + '" (' + c.rule + ')', mode: 'lines+markers',
       line: {dash: 'dot'}, text: c.lens_prob.map(p => 'p = ' + fmt(p, 4)),
       hovertemplate: 'layer %{x}: rank %{customdata} (%{text})<extra></extra>', customdata: c.lens_rank}];
    Plotly.react($('.curve-lens'), traces, {title: {text: 'logit lens at the predicting position, by layer', font: {size: 13}},
      height: 300, margin: {l: 50, r: 10, t: 40, b: 40}, xaxis: {title: 'layer', dtick: 1},
      yaxis: {title: 'rank + 1 (log)', type: 'log', autorange: 'reversed'}, legend: {orientation: 'h', y: -0.25},
      shapes: [{type: 'line', x0: st.layer, x1: st.layer, yref: 'paper', y0: 0, y1: 1, line: {color: '#999', dash: 'dash'}}]},
      {displayModeBar: false, responsive: true});
    const ad = $('.curve-attn');
    if (t.attn_mass){
      Plotly.react(ad, [{x: xs, y: t.attn_mass, name: 'attention on image tokens', mode: 'lines+markers'},
        {x: xs, y: xs.map(() => t.attn_baseline), name: 'uniform attention', mode: 'lines', line: {dash: 'dot', color: '#999'}}],
        {title: {text: 'share of attention on the image, by layer (mean over heads)', font: {size: 13}}, height: 300,
         margin: {l: 50, r: 10, t: 40, b: 40}, xaxis: {title: 'layer', dtick: 1}, yaxis: {range: [0, 1]},
         legend: {orientation: 'h', y: -0.25},
         shapes: [{type: 'line', x0: st.layer, x1: st.layer, yref: 'paper', y0: 0, y1: 1, line: {color: '#999', dash: 'dash'}}]},
        {displayModeBar: false, responsive: true});
    } else {
      ad.innerHTML = '<div class="note">' + esc(data.answers[st.answer].attention_note) + '</div>';
    }
  }
  function drawTable(){
    const t = tokenNow(), a = data.answers[st.answer], l = st.layer;
    const rows = [['token', esc(t.text) + ' (id ' + t.id + ', position ' + t.position + ', ' + esc(a.label) + ')'],
      ['probability / rank at the output', fmt(t.prob, 4) + ' / ' + t.rank],
      ['top ' + t.top.length + ' at the output', t.top.map(x => esc(x.token) + ' ' + fmt(x.prob, 3)).join(', ')],
      ['lens top-1 per layer', t.lens_top.map(esc).join(' → ')]];
    if (t.confidence !== undefined) rows.push(['internal confidence of this token (max over layers, patches)', fmt(t.confidence, 4)]);
    if (t.patch_prob) {
      const p = t.patch_prob[l], r = t.patch_rank[l];
      const best = p.indexOf(Math.max(...p));
      rows.push(['lens at ' + data.layers[l] + ': best patch', 'image token ' + best + ': p = ' + fmt(p[best], 4) +
                 ', rank ' + r[best]]);
    }
    if (t.attn_mass) rows.push(['attention on the image at ' + data.layers[l], fmt(t.attn_mass[l], 4) +
                                ' (uniform: ' + fmt(t.attn_baseline, 3) + ')']);
    if (t.detector !== undefined) rows.push([data.scores.detector.label, fmt(t.detector, 4) + ' (gate threshold ' +
                                             fmt(data.scores.detector.threshold, 2) + ')']);
    if (t.probe !== undefined) rows.push([data.scores.probe.label, fmt(t.probe, 4)]);
    if (t.object) {
      const m = a.mentions.find(x => x.tokens.includes(st.token));
      rows.push(['object word (CHAIR, ' + esc(a.chair ? a.chair.rules : '') + ' rules)', esc(t.word) + ' → ' +
                 esc(t.object) + (t.verdict ? ': <b>' + t.verdict + '</b>' : ' (no --truth given)')]);
      if (m && m.confidence !== undefined) rows.push(['ProjectAway internal confidence c_o of "' + esc(m.word) + '"',
          fmt(m.confidence, 4) + ' (at ' + data.layers[m.confidence_layer] + ', image token ' + m.confidence_patch + ')']);
    }
    $('.details').innerHTML = '<table>' + rows.map(r => '<tr><th>' + r[0] + '</th><td>' + r[1] + '</td></tr>').join('') +
                              '</table>';
  }
  function drawAll(){
    $('.layer-label').textContent = data.layers[st.layer];
    root.dataset.answer = st.answer; root.dataset.token = st.token; root.dataset.layer = st.layer;
    drawMaps(); drawCurves(); drawTable();
  }
  const layerInput = $('.sel-layer');
  layerInput.max = L - 1; layerInput.value = st.layer;
  layerInput.addEventListener('input', () => { st.layer = Number(layerInput.value); drawAll(); });
  $('.sel-kind').addEventListener('change', drawMaps);
  const viewSel = $('.sel-view');
  if (grid.views.length > 1){
    grid.views.forEach((v, i) => { const o = document.createElement('option'); o.value = i;
      o.textContent = v.name + ' (' + v.rows + 'x' + v.cols + ')'; viewSel.appendChild(o); });
    viewSel.addEventListener('change', () => { st.view = Number(viewSel.value); drawMaps(); });
  } else viewSel.parentElement.style.display = 'none';
  const scoreSel = $('.sel-score');
  scoreKeys.forEach(k => { const o = document.createElement('option'); o.value = k; o.textContent = data.scores[k].label;
                           scoreSel.appendChild(o); });
  if (!scoreKeys.length) scoreSel.parentElement.style.display = 'none';
  scoreSel.addEventListener('change', () => { st.score = scoreSel.value; drawStrips(); });
  drawStrips(); drawAll();
  root.haltraceState = st;
};
"""


def _json_block(data: dict[str, Any]) -> str:
    # "</" would end the script element; JSON allows "<\/" for "</"
    return json.dumps(data, allow_nan=False).replace("</", "<\\/")


def _chair_line(answer: dict[str, Any]) -> str:
    chair = answer.get("chair")
    if not chair:
        return ""
    if chair["truth"] is None:
        return f"objects ({html.escape(chair['rules'])} CHAIR rules): {html.escape(', '.join(chair['objects']) or 'none')}"
    bad = chair["hallucinated"]
    return (f"objects: {html.escape(', '.join(chair['objects']) or 'none')}; truth: "
            f"{html.escape(', '.join(chair['truth']))}; hallucinated: "
            f"<b>{html.escape(', '.join(bad) if bad else 'none')}</b> (CHAIR {html.escape(chair['rules'])} rules, "
            f"{html.escape(chair['table'])})")


def render_fragment(data: dict[str, Any], uid: str = "x0", *, heading: str | None = None) -> str:
    """The view as one ``<div>`` plus its data and init script; the page around it must load plotly.js first and
    include :data:`_JS` once (:func:`page_script`)."""
    grid = data["grid"]
    title = heading if heading is not None else (data.get("title") or "haltrace explain")
    image_note = ""
    if data["image"] is None or not grid["spatial"]:
        image_note = f"<div class='note maps-note'>No map over the image: {html.escape(grid['note'])}.</div>"
    else:
        image_note = "<div class='note maps-note' style='display:none'></div>"
    answers = []
    for i, a in enumerate(data["answers"]):
        changed = ""
        if "changed_words" in a:
            changed = (f"<div class='legend'>changed words: {html.escape(', '.join(a['changed_words']) or 'none')}"
                       "</div>")
        answers.append(f"<div class='answer'><h4>{html.escape(a['label'])}: <code>{html.escape(a['text'])}</code></h4>"
                       f"<div class='strip' data-answer='{i}'></div><div class='legend'>{_chair_line(a)}</div>"
                       f"{changed}</div>")
    steering = ""
    if data.get("steering"):
        s = data["steering"]
        steering = (f"<p class='meta'>Steering: {html.escape(s['method'])} ({html.escape(s['source'])}); "
                    f"{'the answer did not change' if s['same'] else 'changed words are underlined'}.</p>")
    grid_line = html.escape(grid["note"]) if grid["spatial"] else "no spatial grid"
    meta = (f"model <code>{html.escape(data['model'])}</code> ({html.escape(data['family'])}, {data['n_layers']} "
            f"layers); prompt <code>{html.escape(data['prompt_text'])}</code>; patch grid: {grid_line}; haltrace "
            f"{html.escape(data['haltrace'])}; computed in {data['seconds']:.2f} s")
    return f"""
<div class="hx" id="hx-{uid}">
<h2>{html.escape(title)}</h2>
<p class="meta">{meta}</p>
{steering}
<div class="answers">{''.join(answers)}</div>
<div class="legend score"></div>
<div class="legend">Click a token to see its maps and curves. Border: red &#10007; = hallucinated object, green &#10003; =
real object (with a ground truth); wavy underline = changed by steering.</div>
<div class="controls">
 <label>layer <input type="range" class="sel-layer" min="0" step="1"> <span class="layer-label"></span></label>
 <label>map <select class="sel-kind"><option value="patch_prob">lens probability</option>
  <option value="patch_rank">lens rank</option></select></label>
 <label>view <select class="sel-view"></select></label>
 <label>colour tokens by <select class="sel-score"></select></label>
</div>
{image_note}
<div class="figs"><div class="fig map-lens"></div><div class="fig map-attn"></div>
<div class="fig curve-lens"></div><div class="fig curve-attn"></div></div>
<div class="details"></div>
<script type="application/json" class="hx-data">{_json_block(data)}</script>
<script>(function(){{const root = document.getElementById("hx-{uid}");
haltraceExplain(root, JSON.parse(root.querySelector("script.hx-data").textContent));}})();</script>
</div>
"""


def page_script() -> str:
    """The CSS and script every page holding explain fragments needs (once per page, after plotly.js)."""
    return f"<style>{_CSS}</style><script>{_JS}</script>"


def render_page(data: dict[str, Any]) -> str:
    """The whole self-contained page for one explanation."""
    from plotly.offline import get_plotlyjs

    title = data.get("title") or f"haltrace explain: {data['answers'][0]['text']}"
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><script type='text/javascript'>{get_plotlyjs()}</script>"
            f"{page_script()}</head><body>{render_fragment(data, 'main', heading=title)}</body></html>\n")
