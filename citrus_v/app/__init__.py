"""The web app: a Gradio page that talks to a running ``citrus-v deploy`` server.

``page`` lays the page out and wires its events to ``handlers``; ``client`` asks the server; ``scan`` reads an
upload (frames, slices, axes, time points, pixel spacing); ``window_menu`` decides when CT windows apply;
``display`` enlarges small pictures and draws the masks; ``answer_chips`` turns each ``[SEG]`` into a coloured
chip; ``measurements`` and ``legend`` list each mask; ``downloads`` writes the mask files.
"""
