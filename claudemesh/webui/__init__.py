"""
C{claudemesh ui}: a local web page to watch and steer a mesh (docs/ui.md).

L{claudemesh.webui.watch} is the page's view of one mesh, kept by a watching
session (C{hello {watch: true}}); L{claudemesh.webui.server} is the
twisted.web tree the page talks to (token and origin checks, the JSON API,
the live WebSocket); L{claudemesh.webui.command} runs it. The page itself is
plain HTML, JavaScript and CSS in C{static/}.
"""
