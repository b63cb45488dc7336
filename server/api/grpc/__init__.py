"""The gRPC API (adapterserve.v1 Generation and Admin) over the serving root (../): servicers, the
conversion between wire messages and the engine's types, the gate interceptor, and the grpc.aio server.

generation.py  Generation servicer: Generate, GenerateStream, GenerateBatch(Stream), Score, GetServerInfo
requests.py    GenerateRequest -> the engine's GenerationRequest (checked by validation.py)
scoring.py     ScoreRequest -> a scoring request; ScoreResponse
admin.py       Admin servicer: upload, list, get, delete, pin
convert.py     internal types <-> wire messages
gate.py        the interceptor: starting/draining, bearer tokens, undecodable bytes
decoding.py    undecodable request bytes -> INVALID_ARGUMENT
errors.py      exceptions -> gRPC statuses, in one place
server.py      the assembled grpc.aio server: servicers, health, reflection, message limits
"""
