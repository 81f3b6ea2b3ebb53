"""uvicorn's HTTP/1.1 protocol, with its parser errors in the OpenAI error format.

A request the HTTP parser rejects (a header value with a control character, a malformed
request line or header) never reaches the app: uvicorn answers it itself with a plain-text
400. OpenAI clients expect `{"error": {...}}` for every 4xx, so this protocol writes that body
instead. It is what `uvicorn.Config(http=...)` accepts; the connection is closed afterwards,
as uvicorn does (the parser's state is lost), and the next connection is served normally.
"""

from __future__ import annotations

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgeserve.http.schemas import ErrorBody, ErrorResponse

PARSER_ERROR_MESSAGE = (
    "The request is not valid HTTP/1.1 (for example a header value with a control character, "
    "or a malformed request line or header); fix the request and send it again."
)
_BODY = msgspec.json.encode(
    ErrorResponse(ErrorBody(PARSER_ERROR_MESSAGE, "invalid_request_error", None, "invalid_http_request"))
)


class OpenAIErrorHTTPProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        """Like uvicorn's own (same headers, connection closed), with a JSON body."""
        del msg  # uvicorn's text ("Invalid HTTP request received.") says less than ours
        content = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(_BODY)).encode("ascii") + b"\r\n",
            b"connection: close\r\n",
            b"\r\n",
            _BODY,
        ])
        self.transport.write(b"".join(content))
        self.transport.close()
