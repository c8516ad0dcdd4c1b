"""The `hive` command: argument parsing and output for people (`main`), shared argument types and
exit codes (`args`), declaring (`declared`), the fleet (`fleet`), tables (`tables`) and the live
view (`top`). It talks to a hive only through `hive.client`."""
