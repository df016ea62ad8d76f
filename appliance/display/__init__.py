"""The ward display: static page (index.html, app.js, style.css, vendored mqtt.js) and its server."""
