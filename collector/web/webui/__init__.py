"""Static files of the web view (index.html, app.js, app.css) and its OpenAPI document."""
