// MathJax 3 settings. Maths reaches the page in two forms:
// - Markdown pages and docstrings (pymdownx.arithmatex, generic mode): wrapped in
//   `.arithmatex` elements with \( \) and \[ \] delimiters; docs/_hooks.py wraps the
//   maths of headings in the table of contents the same way;
// - notebook pages (mkdocs-jupyter): the $...$ and $$...$$ of the Markdown cells, inside
//   `.jp-RenderedMarkdown` elements, in <p>, <li>, ... children without a class.
//
// MathJax decides per element: `ignore = (parent ignored || ignoreHtmlClass matches) &&
// !processHtmlClass matches`, so an element inherits its parent's state unless its own
// class says otherwise. Every element of Material's layout has an `md-` class, so the
// page is ignored from the top down, and typeset inside the two kinds of maths
// containers, children included. (An `ignoreHtmlClass` that also matched elements
// without a class, such as ".*|", would skip the <p> children of notebook cells.)
window.MathJax = {
  loader: { load: ["[tex]/textmacros"] },
  tex: {
    // \texttt{max\_nodes}: text-mode macros such as \_ inside \text and \texttt.
    packages: { "[+]": ["textmacros"] },
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: "md-.*",
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
