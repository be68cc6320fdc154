"""The node daemon (`node.daemon.Node`) and the `meshllm` command line (`node.cli:main`)."""
