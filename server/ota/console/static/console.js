// fedota operator console: the only script, vendored (no build step, no CDN).
// Forms with data-confirm ask before they POST (cancel, rollback); everything else
// works without JavaScript.
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
    return;
  }
  var button = form.querySelector("button[type=submit]");
  if (button) {
    window.setTimeout(function () { button.disabled = true; }, 0); // no double POST
  }
});
