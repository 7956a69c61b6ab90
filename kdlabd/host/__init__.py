"""The host adapter: processes, sockets and files on the machine kdlabd runs on."""
