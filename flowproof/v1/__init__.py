"""Generated from proto/flowproof/v1/ by scripts/gen-proto.sh: the agent–collector contract, v1.

Do not edit; change the .proto file and run `make proto`. Only flowproof.convert turns these
messages into domain types.
"""
