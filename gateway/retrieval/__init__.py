"""The retrieval engine: the instances a request names, fetched from the upstream and
handed, in order and in a transfer syntax the receiver takes, to a `StoreTarget`.

Shared by the fronts that send instances out (C-MOVE and C-GET in `gateway.dimse`,
and a WADO-RS facade), so nothing here knows a DIMSE command, status or association:
a front implements `engine.StoreTarget` and turns `engine.Counts` into its own
statuses. Modules, each importing only those listed before it:

- `request`: what a retrieval asks for (`RetrieveRequest`) and one listed instance;
- `source`: one fetched instance (`Fetched`) and the data set bytes to send;
- `listing`: the instance search on the upstream, in a task of its own (`Listing`);
- `bulk`: whole studies or series read ahead of the search (`BulkFeed`);
- `transcode`: conversion for the receiver within a shared memory budget (`Transcoder`);
- `engine`: the receiver contract, the counts, `Retriever` and its `Pipeline`.
"""
