"""The server: thin gRPC servicers over a transport-free data plane."""
