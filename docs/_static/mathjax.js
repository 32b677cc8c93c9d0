// MathJax 3 settings for pymdownx.arithmatex in generic mode: maths arrives wrapped in
// `.arithmatex` elements with \( \) and \[ \] delimiters. Notebook pages (mkdocs-jupyter)
// keep the $...$ of their markdown cells, so those cells are typeset too.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    // Typeset only inside these classes, never in code blocks or elsewhere.
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown",
  },
};

// With Material's instant loading, pages change without a reload: typeset each new one.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
