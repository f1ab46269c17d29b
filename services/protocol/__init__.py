"""What clients and servers must agree on beyond the .proto files.

The byte layouts that get signed or hashed (documented in the protos), and where the
services listen by default. Both the client SDK and the servers import this package;
it imports nothing else of ours (an import-linter contract holds it to that), so a
client can take it without pulling in any server code.
"""
