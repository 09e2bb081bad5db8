"""The demo contracts: `Ask`, `Subtask`, `WorkerResult`, `Citation`, `Report` (in `demo_pb2`)."""
