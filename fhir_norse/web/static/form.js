// Enhancement only: every step works without this script.
(function () {
  "use strict";
  // After an answer is chosen, bring the next question into view (not its focus: a screen reader keeps
  // its place), so a patient on a phone does not have to scroll to find it.
  document.addEventListener("change", function (event) {
    var input = event.target;
    if (!(input instanceof HTMLInputElement) || input.type !== "radio") return;
    var fieldset = input.closest("fieldset");
    var next = fieldset && fieldset.nextElementSibling;
    if (next && next.matches("fieldset") && !next.querySelector("input:checked")) {
      var reduce = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      next.scrollIntoView({ behavior: reduce ? "auto" : "smooth", block: "start" });
    }
  });
  // A second press on "send" while the first is on its way would only be refused: keep it from leaving.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.dataset.sent === "1") {
      event.preventDefault();
      return;
    }
    form.dataset.sent = "1";
  });
  window.addEventListener("pageshow", function () {
    document.querySelectorAll("form").forEach(function (form) { delete form.dataset.sent; });
  });
  // Errors: take the patient to the list of what is missing.
  var summary = document.querySelector(".error-summary");
  if (summary) {
    summary.setAttribute("tabindex", "-1");
    summary.focus();
  }
})();
