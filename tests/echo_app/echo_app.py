"""The echo app: every online node gets one query; the ServerApp writes how many answered to `out`."""

from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    asks = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(asks, timeout=60))
    answered = sum(1 for r in replies if r.has_content())
    Path(str(context.run_config["out"])).write_text(f"{len(nodes)} {answered}\n")


@client.query()
def answer(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"echo": MetricRecord({"ok": 1})}), reply_to=msg)
